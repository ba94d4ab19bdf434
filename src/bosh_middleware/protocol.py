"""The prebind exchange as plain code over request/response values (sans-I/O).

A *flow* is a generator. It yields a batch of ``BOSHRequest`` s that the driver sends
concurrently and answers with the list of ``BOSHResponse`` s in the same order; the flow's return
value is the result. Drivers (``client.py``) own sockets, pools and timeouts; everything about
XEP-0124/0206, SASL and resource binding lives here, once, for sync and async code alike, and
tests can drive it with canned responses.

Round trips. The classic prebind is strictly sequential: create, auth, (SCRAM response), restart,
bind = 4 HTTP round trips with PLAIN, 5 with SCRAM. A BOSH server must process requests in RID
order and accepts ``requests`` (hold + 1 = 2 for Prosody and ejabberd) at once, so a request that
does not need the previous answer can travel with it:

* PLAIN / ANONYMOUS: create | auth | restart + bind                       -> 3 round trips
* SCRAM:             create | client-first | client-final | restart + bind -> 4 round trips

With quickstart (``ServiceMemory``: the mechanisms are known from an earlier prebind, and the
server answers a SASL message sent with the creation request in its response, as Prosody does):

* PLAIN / ANONYMOUS: create + auth | restart + bind                       -> 2 round trips
* SCRAM:             create + client-first | client-final | restart + bind -> 3 round trips
* SCRAM, pipelined:  create + client-first | client-final, restart + bind -> 2 round trips

and there restart + bind are one request: the bind iq in the restart request's body, which
Prosody handles after the restart, answering both in one response. Where the driver can
(``http11``), SCRAM's client-final and that request go back to back on one connection (an
*ordered* batch, HTTP/1.1 pipelining), which the server reads in RID order: nothing can
overtake anything there. Otherwise only restart + bind are pipelined, on two connections,
and nothing makes the server read two connections' requests in RID order. Prosody defers a
request that overtakes its predecessor and handles its *stanzas* afterwards, which is right
for the bind, but it loses the ``xmpp:restart`` of a deferred restart, so a restart never
travels behind an unanswered request on another connection.
When the bind does overtake the restart (new connections and a busy server make that a few
percent of prebinds), Prosody puts features and bind result on one request and, as hold=1
allows, keeps the other open with nothing to say. That open request would become the "oldest
request" the server writes the browser's first answers to, and with hold=1 no further request
can get rid of it; closing its connection does not either, since the server notices the close
only later. So such a session is terminated and the prebind redone strictly sequentially:
correct always, and as fast as the pipelined form in the usual, in-order case.
"""

from __future__ import annotations

import binascii
import contextlib
import dataclasses
import functools
import ipaddress
import logging
import re
import secrets
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar
from urllib.parse import urlsplit

from lxml import etree

from . import body as b
from .credentials import Credentials, page_safe_jid
from .errors import (
    AuthenticationFailed,
    BOSHError,
    ConfigurationError,
    MechanismUnavailable,
    ProtocolError,
    ServiceUnavailable,
)
from .scram import SCRAM_HASHES, ScramClient
from .session import PrebindOptions, PrebindSession

__all__ = [
    "MECHANISM_PREFERENCE",
    "BOSHRequest",
    "BOSHResponse",
    "Flow",
    "PrebindProtocol",
    "ServerInfo",
    "ServiceMemory",
    "choose_mechanism",
    "initial_rid",
    "is_secure_transport",
    "probe_flow",
    "terminate_flow",
]

T = TypeVar("T")

log = logging.getLogger("bosh_middleware")

#: Strongest first. ANONYMOUS is used only for anonymous credentials.
MECHANISM_PREFERENCE = ("SCRAM-SHA-512", "SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN")

_FEATURES = f"{{{b.NS_STREAMS}}}features"
_STREAM_ERROR = f"{{{b.NS_STREAMS}}}error"
_SUCCESS = f"{{{b.NS_SASL}}}success"
_FAILURE = f"{{{b.NS_SASL}}}failure"
_CHALLENGE = f"{{{b.NS_SASL}}}challenge"
_MECHANISMS = f"{{{b.NS_SASL}}}mechanisms"
_BIND = f"{{{b.NS_BIND}}}bind"
_SESSION = f"{{{b.NS_SESSION}}}session"
_RESTART = "\x00restart"  # marker in a step list: "a stream restart request goes here"
# The SID and the bound JID go into the page. They come from the server, which the engine may
# reach over plain HTTP (SCRAM protects the password, not them), so they are held to what
# servers send: a UUID, hex or base64 SID, a JID ``page_safe_jid`` takes (the escaping alone
# is not enough where a page put the snippet inside an attribute value).
_SID = re.compile(r"[A-Za-z0-9._~:+/=-]{1,256}")


class BOSHRequest(NamedTuple):
    """One request of a flow. (A named tuple, like ``BOSHResponse``: immutable, and made
    without a Python ``__init__``, which a frozen dataclass runs for each of a prebind's
    requests and answers.)"""

    rid: int
    body: bytes
    #: What the request does (``create``, ``auth``, ``bind`` ...): for logs; bodies are never
    #: logged because an auth body carries the password.
    label: str
    #: Cleanup (terminate): send with a short timeout and ignore the outcome.
    best_effort: bool = False
    #: Set on every request of a pipelined batch. Called with the responses received so far (in
    #: any order); True means the batch has what the flow needs, and the driver stops waiting for
    #: the rest (answering ``None`` for them). With hold=1 a server may put every answer into one
    #: response and keep the other request open with nothing to say (Prosody does when the
    #: second request overtakes the first); that request is not waited for.
    settles: Callable[[list[BOSHResponse]], bool] | None = None
    #: Set on every request of an *ordered* batch: the requests go back to back on one
    #: connection (HTTP/1.1 pipelining), so that the server reads them in RID order, and every
    #: one is answered, in that order (``settles`` is None). A driver that cannot pipeline sends
    #: each after the answer to the one before, which is as correct, one round trip slower.
    ordered: bool = False

    def __repr__(self) -> str:
        # The body's size, never the body: an auth body carries the password (PLAIN) or a
        # proof that is as good as it for an offline guess (SCRAM), and a request reaches
        # reprs that nobody meant to log (a traceback's locals, a test's assertion).
        return f"BOSHRequest(rid={self.rid}, label={self.label!r}, body=<{len(self.body)} bytes>)"


class BOSHResponse(NamedTuple):
    status_code: int
    body: bytes


class Derive(NamedTuple):
    """A step of a flow that is no request: CPU work (SCRAM's PBKDF2) for the driver to do
    before it sends the flow an empty list and goes on, inline (sync) or in a thread (async,
    so that the event loop is not stalled). An error it raises is thrown into the flow, which
    ends the session it made."""

    run: Callable[[], object]


Flow = Generator["list[BOSHRequest] | Derive", list["BOSHResponse | None"], T]

#: ``tuple.__new__``: a ``BOSHRequest`` made in C, without the named tuple's Python ``__new__``.
_new = tuple.__new__


@dataclass(frozen=True)
class ServerInfo:
    """What ``bosh-middleware check`` reports about an endpoint."""

    attrs: dict[str, str]
    mechanisms: list[str]
    features: list[str]


def initial_rid() -> int:
    """A CSPRNG RID in [2**32, 2**32 + 2**44).

    Large, so it cannot be guessed, and more than 2**52 below JavaScript's 2**53 - 1, so no
    session can ever count past the largest integer a browser client represents exactly.
    """
    return 2**32 + secrets.randbits(44)


@functools.lru_cache(maxsize=64)  # asked for every prebind, of the one or two URLs there are
def is_secure_transport(url: str) -> bool:
    """HTTPS, or plain HTTP that never leaves the machine."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        return True
    host = (parts.hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: Why a server offers no SASL mechanism at all, and what to do: Prosody's
#: c2s_require_encryption (its default) hides them over plain HTTP, which is how a web server
#: reaches it on loopback behind a TLS proxy. Prosody takes X-Forwarded-Proto from a trusted
#: proxy (loopback, by default), so the engine's ``headers`` can say so too.
NO_MECHANISMS_HINT = (
    "a server that requires encryption (Prosody's c2s_require_encryption) offers none over"
    " plain HTTP: set consider_bosh_secure = true there, or send X-Forwarded-Proto: https"
    " from an address it trusts as a proxy (HEADERS; Prosody trusts loopback)"
)


def choose_mechanism(
    offered: Sequence[str], credentials: Credentials, options: PrebindOptions, *, secure: bool
) -> str:
    offered_set = {m.upper() for m in offered}
    none = f"; {NO_MECHANISMS_HINT}" if not offered_set else ""
    if credentials.is_anonymous:
        if "ANONYMOUS" in offered_set:
            return "ANONYMOUS"
        raise MechanismUnavailable(
            f"server does not offer ANONYMOUS on {credentials.domain}"
            f" (offers {sorted(offered_set)}){none}",
            condition="invalid-mechanism",
        )
    refused_plain = False
    for mech in options.mechanisms or MECHANISM_PREFERENCE:
        mech = mech.upper()
        if mech not in offered_set or mech not in MECHANISM_PREFERENCE:
            continue
        if mech == "PLAIN" and not (secure or options.allow_insecure_plain):
            refused_plain = True
            continue
        return mech
    hint = (
        "; PLAIN is offered but refused over plain HTTP that leaves this machine (to a"
        " non-loopback host, or through a proxy): use https or allow_insecure_plain=True"
        if refused_plain
        else none
    )
    raise MechanismUnavailable(
        f"no usable SASL mechanism: server offers {sorted(offered_set)}{hint}",
        condition="invalid-mechanism",
    )


def _local(el: etree._Element) -> str:
    """The local name of an element's tag (``{ns}name`` -> ``name``): what QName says, without
    making one."""
    tag = str(el.tag)
    return tag[tag.rfind("}") + 1 :]


def _condition(el: etree._Element) -> str | None:
    for child in el:
        if isinstance(child.tag, str) and _local(child) != "text":
            return _local(child)
    return None


def _b64encode(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _b64decode(text: str | None) -> bytes:
    text = (text or "").strip()
    if text in ("", "="):
        return b""
    try:
        return binascii.a2b_base64(text, strict_mode=True)  # = b64decode(validate=True), in C
    except ValueError:
        raise ProtocolError("SASL payload is not valid base64") from None


def _raise_sasl_failure_in(children: list[etree._Element]) -> None:
    """A SASL ``<failure/>`` among a terminating body's children is the login refused (one
    ``AuthenticationFailed``), not the session ended for another reason."""
    for child in children:
        if child.tag == _FAILURE:
            cond = _condition(child) or "not-authorized"
            raise AuthenticationFailed(f"SASL failure: {cond}", condition=cond)


def _raise_stream_error_in(children: list[etree._Element]) -> None:
    """A stream error among a body's children is its cause (ejabberd wraps every one in
    ``type='terminate' condition='remote-stream-error'``)."""
    for child in children:
        if child.tag == _STREAM_ERROR:
            cond = _condition(child) or "undefined-condition"
            raise ServiceUnavailable(f"XMPP stream error: {cond}", condition=cond)


class _Conversation:
    """RID counter, SID and the stanzas received so far: what all flows share."""

    def __init__(self, to: str, options: PrebindOptions, rid: int | None) -> None:
        self.to = to
        self.options = options
        self.rid = initial_rid() if rid is None else rid
        self.sid: str | None = None
        self.attrs: dict[str, str] = {}
        self.inbox: list[etree._Element] = []
        self.window = 1
        self.round_trips = 0
        self.request_count = 0
        self.polls = 0
        #: Requests of pipelined batches that the server kept open (see ``_HeldRequest``).
        self.held = 0
        #: The first RID of a batch whose answers did not all come (a driver's error, a
        #: cancellation): the server may expect any RID from it on (``terminate_requests``).
        self.unsure: int | None = None
        #: Bodies of the current batch already parsed by ``settles``: id(bytes) -> (bytes, parsed).
        self._parsed: dict[int, tuple[bytes, b.ParsedBody]] = {}

    def _parse(self, response: BOSHResponse) -> b.ParsedBody:
        """Parse once per batch: ``settles`` (each time an answer arrives) and ``_absorb`` all
        need the same answers. Keyed by the body, not the response: a driver may wrap one
        body in a new ``BOSHResponse`` for every call."""
        data = response.body
        hit = self._parsed.get(id(data))
        if hit is not None and hit[0] is data:
            return hit[1]
        parsed = b.parse_body(data, max_size=self.options.max_response_size)
        self._parsed[id(data)] = (data, parsed)
        return parsed

    def _request(
        self,
        label: str,
        body: bytes,
        *,
        best_effort: bool = False,
        settles: Callable[[list[BOSHResponse]], bool] | None = None,
        ordered: bool = False,
    ) -> BOSHRequest:
        req = _new(BOSHRequest, (self.rid, body, label, best_effort, settles, ordered))
        self.rid += 1
        return req

    def _build(
        self,
        label: str,
        payload: str,
        settles: Callable[[list[BOSHResponse]], bool] | None,
        ordered: bool = False,
    ) -> BOSHRequest:
        assert self.sid is not None
        if payload.startswith(_RESTART):  # (what follows the marker goes in the same body)
            body = b.restart_body(
                rid=self.rid,
                sid=self.sid,
                to=self.to,
                lang=self.options.lang,
                payload=payload[len(_RESTART) :],
            )
        else:
            body = b.request_body(rid=self.rid, sid=self.sid, payload=payload)
        return self._request(label, body, settles=settles, ordered=ordered)

    def terminate_requests(self) -> list[BOSHRequest]:
        """What ends the session: a terminate with the next RID; after a batch whose answers
        did not all come (``unsure``), one for each RID the server may expect next. A proxy
        may have dropped the rest of a pipeline, or the server got a request whose answer was
        lost: a terminate one RID ahead of what the server got is held until the missing one
        comes (Prosody: "rid skipped ... deferring"), and would leave the session to its
        inactivity timeout and the cleanup to its own. Each of these is answered at once once
        one of them ends the session: Prosody replays (or holds until then) a repeated RID's
        answer, and ends the session on the RID it expects."""
        assert self.sid is not None
        last = self.rid
        if self.unsure is not None:
            self.rid = self.unsure  # (``_request`` counts up from there to ``last`` again)
        return [
            self._request(
                "terminate", b.terminate_body(rid=self.rid, sid=self.sid), best_effort=True
            )
            for _ in range(self.rid, last + 1)
        ]

    def _absorb(self, response: BOSHResponse, batched: bool) -> b.ParsedBody:
        if response.status_code != 200:
            raise ServiceUnavailable(
                f"BOSH endpoint answered HTTP {response.status_code}",
                condition=f"http-{response.status_code}",
            )
        if batched:  # ``settles`` may have parsed it already
            parsed = self._parse(response)
        else:  # the one answer, parsed here only
            parsed = b.parse_body(response.body, max_size=self.options.max_response_size)
        self.inbox.extend(parsed.children)
        if parsed.type == "terminate":  # (with a stream error in it too: ejabberd's wrapping)
            self.sid = None  # nothing left to clean up
        _raise_stream_error_in(parsed.children)
        if parsed.type == "terminate":
            _raise_sasl_failure_in(parsed.children)
            cond = parsed.condition or "terminate"
            raise ServiceUnavailable(f"BOSH session terminated by server: {cond}", condition=cond)
        return parsed

    def create(self, payload: str = "") -> Flow[None]:
        """Open the session; ``payload`` travels in the creation request (quickstart)."""
        o = self.options
        req = self._request(
            "create",
            b.create_body(
                rid=self.rid,
                to=self.to,
                wait=o.wait,
                hold=o.hold,
                lang=o.lang,
                route=o.route,
                payload=payload,
            ),
        )
        (response,) = yield [req]
        if response is None:
            raise ProtocolError("driver returned no response to the session creation request")
        self.round_trips += 1
        self.request_count += 1
        if response.status_code != 200:
            raise ServiceUnavailable(
                f"BOSH endpoint answered HTTP {response.status_code}",
                condition=f"http-{response.status_code}",
            )
        parsed = b.parse_body(response.body, max_size=o.max_response_size)
        if parsed.type == "terminate":
            _raise_sasl_failure_in(parsed.children)  # (a quickstart SASL message refused)
            # A stream error in it is the cause, as in ``_absorb``: ejabberd wraps every one
            # in condition='remote-stream-error' (mod_fail2ban's ban of this address is a
            # policy-violation there, a refusal, not a sick server).
            _raise_stream_error_in(parsed.children)
            cond = parsed.condition or "terminate"
            raise ServiceUnavailable(f"BOSH session refused: {cond}", condition=cond)
        attrs = parsed.attrs
        sid = attrs.get("sid")
        if not sid:
            raise ProtocolError("BOSH session creation response has no sid")
        if not _SID.fullmatch(sid):
            raise ProtocolError("BOSH session creation response has a sid no server sends")
        self.sid = sid
        self.attrs = attrs
        requests = parsed.int_attr("requests") or 1
        self.window = max(1, min(requests, o.max_in_flight)) if o.pipeline else 1
        self.inbox.extend(parsed.children)
        _raise_stream_error_in(parsed.children)

    def exchange(
        self,
        steps: Sequence[tuple[str, str]],
        needs: Sequence[Callable[[etree._Element], bool]] = (),
    ) -> Flow[None]:
        """Send the steps in RID order, ``window`` at a time, and absorb the answers.

        ``needs``: what a pipelined batch must bring back; once every one has arrived (or an
        error), requests still unanswered are not waited for.
        """
        pending = list(steps)
        while pending:
            batch_steps, pending = pending[: self.window], pending[self.window :]
            settles = self._settles(needs) if len(batch_steps) > 1 else None
            batch = []  # (a loop: a list comprehension is one more call in Python 3.11)
            for label, payload in batch_steps:
                batch.append(self._build(label, payload, settles))
            self.unsure = batch[0].rid
            responses = yield batch
            self.unsure = None
            if len(responses) != len(batch):
                raise ProtocolError("driver returned the wrong number of responses")
            self.round_trips += 1
            self.request_count += len(batch)
            try:
                for response in responses:
                    if response is not None:
                        self._absorb(response, settles is not None)
            finally:
                self._parsed.clear()
            self.held += responses.count(None)

    def pipelined(self, steps: Sequence[tuple[str, str]]) -> Flow[list[BOSHResponse]]:
        """Send the steps as one ordered batch (back to back on one connection) and return
        their answers, in order, not yet absorbed: the caller absorbs each when it is ready
        for what it may say (a SASL failure in the first comes before whatever the server made
        of the second)."""
        batch = []
        for label, payload in steps:
            batch.append(self._build(label, payload, None, True))
        self.unsure = batch[0].rid
        try:
            responses = yield batch
        except BOSHError as exc:  # (the answers that came, came in order: those were read)
            self.unsure += len(exc.answers)
            raise
        self.unsure = None
        if len(responses) != len(batch) or None in responses:
            raise ProtocolError("driver did not answer every request of an ordered batch")
        self.round_trips += 1
        self.request_count += len(batch)
        return responses  # type: ignore[return-value]

    def absorb(self, response: BOSHResponse) -> None:
        """One answer of ``pipelined``: its stanzas go to the inbox, its errors are raised."""
        self._absorb(response, False)

    def _settles(
        self, needs: Sequence[Callable[[etree._Element], bool]]
    ) -> Callable[[list[BOSHResponse]], bool]:
        def settles(responses: list[BOSHResponse]) -> bool:
            children: list[etree._Element] = []
            for response in responses:
                if response.status_code != 200:
                    return True
                try:
                    parsed = self._parse(response)
                except BOSHError:
                    return True
                if parsed.type == "terminate":
                    return True
                children += parsed.children
            for child in children:  # (loops: generators here cost more than the checks)
                if child.tag == _FAILURE or child.tag == _STREAM_ERROR:
                    return True
            if not needs:
                return False
            for need in needs:
                for child in children:
                    if need(child):
                        break
                else:
                    return False
            return True

        return settles

    def wait_for(
        self, match: frozenset[str] | Callable[[etree._Element], bool], what: str
    ) -> Flow[etree._Element]:
        """The first received element that matches (its tag is one of ``match``, or
        ``match(el)`` is true), polling (bounded) until it comes. Tags are looked up without a
        call per element."""
        while True:
            el = self.take(match)
            if el is not None:
                return el
            if self.polls >= self.options.max_polls:
                raise ProtocolError(f"server never sent {what}")
            self.polls += 1
            yield from self.exchange([("poll", "")])

    def take(
        self, match: frozenset[str] | Callable[[etree._Element], bool]
    ) -> etree._Element | None:
        """The first received element that matches, taken out of the inbox, or ``None``."""
        tags = match if type(match) is frozenset else None
        for i, el in enumerate(self.inbox):
            if (el.tag in tags) if tags is not None else match(el):  # type: ignore[operator]
                del self.inbox[i]
                return el
        return None


def _tag_in(*tags: str) -> Callable[[etree._Element], bool]:
    wanted = set(tags)
    return lambda el: el.tag in wanted


#: What ``wait_for`` looks for most: tags, matched without a call per element.
_IS_FEATURES = frozenset({_FEATURES})
_IS_SASL_ANSWER = frozenset({_CHALLENGE, _SUCCESS, _FAILURE})


def _iq_result(iq_id: str) -> Callable[[etree._Element], bool]:
    return lambda el: _local(el) == "iq" and el.get("id") == iq_id


def _mechanisms(features: etree._Element) -> list[str]:
    mechs = features.find(_MECHANISMS)
    if mechs is None:
        return []
    return [(m.text or "").strip() for m in mechs if isinstance(m.tag, str) and m.text]


class _HeldRequest(Exception):
    """A pipelined request is still open at the server: the session must not be handed out."""


class _NoQuickstart(Exception):
    """The SASL message sent with the creation request, or the bind sent with the restart,
    got no answer in its response, or the mechanism is no longer offered: this session is
    ended, and prebound again the usual way."""


class _NoPipelining(Exception):
    """The pipelined finish (SCRAM's last step with the restart + bind, one connection) did
    not work: this session is ended, and prebound again with quickstart but one request at a
    time. ``refusal``: the error, where it may be the server (or a proxy) refusing pipelined
    requests; pipelining then goes off once the next attempt has worked. ``None``: the server
    answered, just not as a pipelining server does; pipelining is off already."""

    def __init__(self, refusal: BOSHError | None) -> None:
        super().__init__(refusal)
        self.refusal = refusal


#: SASL failures that are about the credentials, and would be the same the usual way: raised
#: at once, so that a wrong password costs one attempt, not two.
_CREDENTIALS_REFUSED = frozenset(
    # (RFC 6120's, and SCRAM's server-final errors that say the same: RFC 5802, 7)
    {"not-authorized", "account-disabled", "credentials-expired", "invalid-proof", "unknown-user"}
)
#: Failures that say the server is down, slow or elsewhere, or refuses the domain: nothing a
#: quickstart payload causes. Raised as they are, not tried again (a timeout is not doubled).
_NOT_THE_PAYLOAD = frozenset(
    {
        "timeout",
        "connection-failed",
        "http-error",
        "closed",
        "system-shutdown",
        "remote-connection-failed",
        "host-gone",
        "host-unknown",
        "improper-addressing",
        "see-other-uri",
        "other-request",
        "item-not-found",
        "server-signature-mismatch",  # (an impostor, or a broken server: not asked twice)
        "unsafe-jid",  # (the account's JID: bound the usual way too)
    }
)


def _payload_refused(exc: BOSHError) -> bool:
    """Whether a failure of a prebind that sent quickstart's payloads may be the server
    refusing them (a server that wants the restart request empty, as XEP-0206's examples
    show it, or no SASL before the features): worth one more try the usual way."""
    if isinstance(exc, ConfigurationError | MechanismUnavailable):
        return False
    if isinstance(exc, AuthenticationFailed):
        return exc.condition not in _CREDENTIALS_REFUSED
    cond = exc.condition or ""
    return cond not in _NOT_THE_PAYLOAD and not cond.startswith("http-5")


class _Off(NamedTuple):
    """A feature off for a domain: until when, for how long this time, and whether a prebind
    is trying it again (``ServiceMemory``)."""

    until: float
    period: float
    trying: bool


class ServiceMemory:
    """What earlier prebinds learnt of one BOSH service, for the next ones: the SASL mechanisms
    each domain offered, and the domains where quickstart or pipelining is off.

    Quickstart (after XEP-0305's pipelining of stream negotiation): the first SASL message
    travels in the session creation request, so the creation response brings the features and
    the server's first SASL answer at once; and then the bind travels in the restart request,
    so its response brings the new features and the bind result. That saves a round trip, and
    the pipelined restart + bind pair, where the server handles a creation or restart
    request's payload before it answers it, as Prosody does. ejabberd handles the SASL message
    too, but answers on the next request, which saves nothing (and it drops a bind sent with
    the restart); a server could also ignore it, and a poll for the answer would then be held
    until the session's ``wait``. So a response without the answer ends that session (the
    prebind is made again the usual way, at once) and turns quickstart off for the domain:
    one extra request or two. A failure that may be a server refusing the payloads
    (``_payload_refused``: not a wrong password, a timeout, a refused connection or a 5xx) is
    tried again the usual way too, and turns quickstart off if that works; if that fails too
    (the server refuses every session), the mechanisms are forgotten until a prebind works.

    Pipelining (``pipelines``; only where the driver sends an ordered batch on one
    connection): with quickstart, SCRAM's last step and the restart + bind go back to back,
    and a warm SCRAM prebind takes two round trips. A server (or proxy) that gets that wrong
    (no SASL outcome in the first answer, no bind result in the second, a 4xx, a connection
    that ends between the answers) has that session ended and the prebind made again with
    quickstart, one request at a time; pipelining then goes off for the domain. A timeout of
    the pipelined pair is raised as it is, and turns pipelining off too: a proxy that stalls
    the second request would otherwise time out every prebind.

    Off is for a while, not for good: a server gets upgraded, a proxy is replaced, and one
    timeout of a busy server's must not cost every later prebind a round trip for the life of
    the process. After ``RETRY_AFTER`` seconds one prebind tries the feature again (the
    others keep it off until that one knows): if it works, the feature is back on; if not,
    it stays off twice as long as the last time, up to ``RETRY_MAX``. A server that never
    takes it costs one redone prebind per period (one that times out, for a proxy that
    stalls the pipelined pair): tries 10, 30, 70, 150, 310, 630 and 1270 minutes after the
    first failure, seven in the first day, then one a day. Switching off and on are logged
    at INFO.

    One per ``Prebinder``; small (a domain's entry is a tuple of names), bounded, and shared by
    threads and tasks without a lock: each update is one dict operation, and a lost one
    is learnt again by the next prebind.
    """

    #: Domains remembered at most (a service hosting more forgets and learns them again).
    MAX_DOMAINS = 1024
    #: Seconds a feature stays off before one prebind tries it again; each failed try doubles
    #: it, up to ``RETRY_MAX``.
    RETRY_AFTER = 600.0
    RETRY_MAX = 86400.0

    def __init__(
        self, *, pipelining: bool = False, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._offered: dict[str, tuple[str, ...]] = {}
        self._off: dict[str, _Off] = {}
        #: The driver sends an ordered batch on one connection (``BOSHRequest.ordered``): then,
        #: with quickstart, SCRAM's last step and restart + bind travel together.
        self.pipelining = pipelining
        self._unpipelined: dict[str, _Off] = {}
        self._clock = clock

    def quickstart(self, domain: str) -> tuple[str, ...] | None:
        """The mechanisms ``domain`` offered last, if quickstart may be tried there."""
        if domain in self._off and self._still_off(self._off, "quickstart", domain):
            return None
        return self._offered.get(domain)

    def learn(self, domain: str, offered: tuple[str, ...]) -> None:
        if self._offered.get(domain) != offered:
            if len(self._offered) >= self.MAX_DOMAINS:
                self._offered.clear()
            self._offered[domain] = offered

    def forget(self, domain: str) -> None:
        """Quickstart not tried for ``domain`` until a prebind there learns its mechanisms
        again (``learn``): not off for a period, as nothing says the server refuses it."""
        self._offered.pop(domain, None)

    def turn_off(self, domain: str, why: str) -> None:
        self._switch_off(self._off, "quickstart", domain, why, "prebinding the usual way")

    def pipelines(self, domain: str) -> bool:
        """Whether SCRAM's last step and the restart + bind may be pipelined for ``domain``."""
        if not self.pipelining:
            return False
        return domain not in self._unpipelined or not self._still_off(
            self._unpipelined, "pipelining", domain
        )

    def stop_pipelining(self, domain: str, why: str) -> None:
        self._switch_off(self._unpipelined, "pipelining", domain, why, "one request at a time")

    def worked(self, domain: str, *, pipelined: bool) -> None:
        """A prebind with quickstart (and, if ``pipelined``, a pipelined finish) succeeded:
        what was being tried again is back on. (Only a try ends an off period: a prebind that
        was under way when the feature went off says nothing of the next ones.)"""
        if self._off:
            self._back_on(self._off, "quickstart", domain)
        if pipelined and self._unpipelined:
            self._back_on(self._unpipelined, "pipelining", domain)

    def _still_off(self, off: dict[str, _Off], what: str, domain: str) -> bool:
        """Whether ``domain`` is in ``off`` and its period runs; the first prebind to ask once
        it has run out tries the feature again (the others keep it off meanwhile)."""
        entry = off.get(domain)
        if entry is None:
            return False
        now = self._clock()
        if now < entry.until:
            return True
        off[domain] = _Off(now + entry.period, entry.period, True)
        log.info("%s: trying it again for %s", what, domain)
        return False

    def _switch_off(
        self, off: dict[str, _Off], what: str, domain: str, why: str, then: str
    ) -> None:
        """Put ``domain`` in ``off`` (bounded), saying so at INFO: for ``RETRY_AFTER`` the
        first time, twice as long as the last time after a failed try. A second report of
        what is already off (prebinds that were under way together) changes nothing."""
        entry = off.get(domain)
        if entry is not None and not entry.trying:
            return
        period = self.RETRY_AFTER if entry is None else min(entry.period * 2, self.RETRY_MAX)
        if entry is None and len(off) >= self.MAX_DOMAINS:
            off.clear()
        off[domain] = _Off(self._clock() + period, period, False)
        log.info("%s off for %s: %s; %s (tried again in %.0f s)", what, domain, why, then, period)

    def _back_on(self, off: dict[str, _Off], what: str, domain: str) -> None:
        entry = off.get(domain)
        if entry is not None and entry.trying:
            off.pop(domain, None)
            log.info("%s back on for %s", what, domain)


class PrebindProtocol:
    """One prebind: ``flow()`` is the generator a driver runs.

    ``sid``/``rid`` stay readable so that a driver interrupted from outside (a cancelled task, a
    deadline) can still terminate the half-made session instead of orphaning it.
    """

    def __init__(
        self,
        credentials: Credentials,
        options: PrebindOptions,
        *,
        service_url: str,
        rid: int | None = None,
        memory: ServiceMemory | None = None,
        secure: bool | None = None,
    ) -> None:
        self.credentials = credentials
        self.options = options
        self.service_url = service_url
        #: Where quickstart learns (``None``: never tried; see ``ServiceMemory``).
        self.memory = memory if options.quickstart else None
        #: Whether PLAIN may go out (``choose_mechanism``). The URL alone says so for https and
        #: loopback (``None``), but only the driver knows whether a proxy carries its requests:
        #: plain HTTP to 127.0.0.1 through one leaves the machine, and a driver says False.
        self.secure = is_secure_transport(service_url) if secure is None else secure
        self._conv = _Conversation(credentials.domain, options, rid)
        self.finished = False
        #: This attempt sent quickstart's payloads; and pipelined SCRAM's finish.
        self._quick = self._piped = False
        #: Whether this prebind may pipeline SCRAM's finish (see ``_finish_pipelined``).
        self._pipelining = options.pipeline
        #: The mechanisms this attempt's quickstart went by: its redo one request at a time
        #: (a pipelined finish that failed) goes by them too, rather than ask the memory
        #: again, which says "off" while this prebind is the one trying quickstart again.
        self._known: tuple[str, ...] | None = None

    def __repr__(self) -> str:
        return f"<PrebindProtocol {self.credentials.user_key} sid={self._conv.sid!r}>"

    @property
    def sid(self) -> str | None:
        return self._conv.sid

    def abort_requests(self) -> list[BOSHRequest]:
        """What ends a session left half-made (one batch; none if there is no session)."""
        if self._conv.sid is None or self.finished:
            return []
        self.finished = True
        return self._conv.terminate_requests()

    def flow(self) -> Flow[PrebindSession]:
        spent: list[_Conversation] = []
        retried = False
        refused: BOSHError | None = None
        unpiped: BOSHError | None = None
        memory = self.memory
        try:
            # At most four attempts: each way out below turns off what caused it.
            while True:
                try:
                    session = yield from self._run()
                    break
                except _NoPipelining as exc:
                    unpiped = exc.refusal or unpiped
                    spent.append((yield from self._restart_conversation(pipelining=False)))
                except _NoQuickstart:
                    spent.append((yield from self._restart_conversation(quickstart=False)))
                except BOSHError as exc:
                    if not self._quick or not _payload_refused(exc):
                        if refused is not None and memory is not None:
                            # The usual way failed too: the payloads were not what the server
                            # refused (a ban of this address, a proxy's 403), and every page
                            # would pay a second creation request. Prebind the usual way until
                            # a prebind works again (and learns the mechanisms anew).
                            memory.forget(self.credentials.domain)
                        raise
                    # Quickstart off for this domain only if the usual way works (below).
                    refused = exc
                    spent.append((yield from self._restart_conversation(quickstart=False)))
                except _HeldRequest:
                    # The pipelined bind overtook the restart and the server now holds a
                    # request that would swallow the browser's first answers: this session is
                    # unusable. End it and prebind again with one request open at any time.
                    spent.append((yield from self._restart_conversation(pipeline=False)))
                    retried = True
        except Exception:
            cleanup = self.abort_requests()
            if cleanup:
                with contextlib.suppress(BOSHError):
                    yield cleanup
            raise
        self.finished = True
        if self._quick and memory is not None:  # (what was being tried again worked)
            memory.worked(self._conv.to, pipelined=self._piped)  # (to: the domain, computed)
        if unpiped is not None and memory is not None:  # (one request at a time worked)
            why = f"it refused a pipelined SCRAM finish ({unpiped})"
            memory.stop_pipelining(self.credentials.domain, why)
        if refused is not None and memory is not None:  # (the usual way worked)
            # (the refusal may have been of the creation or of the restart request)
            why = f"it refused a prebind that carried quickstart's payloads ({refused})"
            memory.turn_off(self.credentials.domain, why)
        if spent:
            session = dataclasses.replace(
                session,
                round_trips=session.round_trips + sum(c.round_trips for c in spent),
                request_count=session.request_count + sum(c.request_count for c in spent),
                polls=session.polls + sum(c.polls for c in spent),
                retried=retried,
            )
        return session

    def _restart_conversation(
        self, *, quickstart: bool = True, pipeline: bool = True, pipelining: bool = True
    ) -> Flow[_Conversation]:
        """End this attempt's session and start a new conversation, with quickstart,
        pipelining or (``pipeline``) every concurrent request turned off: the spent
        conversation, for its counts."""
        cleanup = self.abort_requests()
        if cleanup:
            with contextlib.suppress(BOSHError):
                yield cleanup
        spent = self._conv
        if not pipelining:
            self._pipelining = False
        else:
            self._known = None
        if not quickstart:
            self.memory = None
        if not pipeline:
            self.options = dataclasses.replace(self.options, pipeline=False)
        self._conv = _Conversation(self.credentials.domain, self.options, None)
        self.finished = False
        self._quick = self._piped = False
        return spent

    def _run(self) -> Flow[PrebindSession]:
        conv, creds, opts = self._conv, self.credentials, self.options
        memory, domain = self.memory, creds.domain
        if memory is None:
            known = None
        elif self._known is not None:  # (the redo of a pipelined finish: see ``_known``)
            known = self._known
        else:
            known = memory.quickstart(domain)
        answer: etree._Element | None = None
        mech = quick = ""
        if known is not None:
            # (a mechanism refused here is refused again below, on what the server offers now)
            with contextlib.suppress(MechanismUnavailable):
                mech = choose_mechanism(known, creds, opts, secure=self.secure)
            if mech:
                scram, quick = self._first_message(mech)
                auth = quick
        self._quick = bool(quick)
        self._known = known if quick else None
        yield from conv.create(quick)
        features = yield from conv.wait_for(_IS_FEATURES, "stream features")
        offered = tuple(_mechanisms(features))
        if memory is not None:
            memory.learn(domain, offered)
        if quick:
            answer = conv.take(_IS_SASL_ANSWER)
            if answer is None:
                assert memory is not None
                memory.turn_off(domain, "the creation response did not answer its SASL message")
                raise _NoQuickstart
            if mech not in {m.upper() for m in offered}:
                raise _NoQuickstart  # (what the server offers now is learnt)
        else:
            mech = choose_mechanism(offered, creds, opts, secure=self.secure)
            scram, auth = self._first_message(mech)

        drawn = secrets.token_hex(10)  # one draw: 12 hex digits for the resource, 8 for the id
        resource = creds.resource or f"{opts.resource_prefix}-{drawn[:12]}"
        bind_id = f"bind_{drawn[12:]}"
        bind_iq = (
            f"<iq id='{bind_id}' type='set' xmlns='{b.NS_CLIENT}'><bind xmlns='{b.NS_BIND}'>"
            f"<resource>{b.escape(resource)}</resource></bind></iq>"
        )
        if scram is not None:
            if answer is None:
                yield from conv.exchange([("auth", auth)])
                answer = yield from conv.wait_for(_IS_SASL_ANSWER, "a SASL answer")
            self._raise_if_failure(answer)
            if answer.tag != _CHALLENGE:
                raise ProtocolError("server skipped the SCRAM challenge")
            server_first = _b64decode(answer.text)
            work = scram.derivation(server_first)
            if work is not None:  # (not cached: the driver does it first, off the loop)
                yield Derive(work)
            final = _b64encode(scram.client_final(server_first))
            last = ("auth-response", f"<response xmlns='{b.NS_SASL}'>{final}</response>")
            answer = None
            if quick and self._pipelining:
                assert memory is not None
                if memory.pipelines(domain):
                    bound = yield from self._finish_pipelined(last, bind_id, bind_iq, scram)
                    return (yield from self._finish(*bound, mech))
        else:
            last = ("auth", auth)
        if answer is None:
            # The last SASL step travels alone here: a restart must not be pipelined with it
            # on two connections, because Prosody, when the restart overtakes it (nothing
            # orders two TCP connections), defers the restart and then drops its
            # xmpp:restart. (On one connection nothing overtakes: ``_finish_pipelined``.)
            yield from conv.exchange([last])
            answer = yield from conv.wait_for(_IS_SASL_ANSWER, "SASL success")
        self._check_success(answer, scram)

        if quick:
            # A server that answered the SASL message of the creation request at once also
            # handles the bind in the restart request's body, after the restart (Prosody):
            # one request, no second connection, nothing to overtake.
            yield from conv.exchange([("restart+bind", _RESTART + bind_iq)])
            bound_features = conv.take(_IS_FEATURES)
            result = conv.take(_iq_result(bind_id))
            if bound_features is None or result is None:
                assert memory is not None
                memory.turn_off(domain, "the restart response did not answer its bind")
                raise _NoQuickstart
        else:
            # Restart and bind together: a bind that overtakes the restart is deferred by the
            # server and its stanza processed right after the restart, which is what RID order
            # promises.
            yield from conv.exchange(
                [("restart", _RESTART), ("bind", bind_iq)],
                needs=[_tag_in(_FEATURES), _iq_result(bind_id)],
            )
            if conv.held:
                raise _HeldRequest
            bound_features = yield from conv.wait_for(_IS_FEATURES, "stream features after restart")
            result = yield from conv.wait_for(_iq_result(bind_id), "the bind result")
        return (yield from self._finish(bound_features, result, mech))

    def _finish_pipelined(
        self, last: tuple[str, str], bind_id: str, bind_iq: str, scram: ScramClient
    ) -> Flow[tuple[etree._Element, etree._Element]]:
        """SCRAM's last step and the restart + bind as one ordered batch: back to back on one
        connection, so the server reads them in RID order (checks the proof, answers, then
        restarts and binds, as Prosody does), and a warm SCRAM prebind takes two round trips.
        The answers are taken in order: a SASL failure in the first is what it is, whatever
        the server made of the second, and the server's signature is verified before anything
        of the second is used (a session whose signature is wrong is ended like any failed
        one; the bind sent ahead of it carries nothing secret). The features and the bind
        result, for ``_finish``."""
        conv, memory, domain = self._conv, self.memory, self.credentials.domain
        assert memory is not None
        try:
            first, second = yield from conv.pipelined([last, ("restart+bind", _RESTART + bind_iq)])
        except BOSHError as exc:
            if exc.condition == "timeout":  # not tried again; but a proxy that stalls a
                # pipelined request would time out every prebind: one request at a time now
                memory.stop_pipelining(domain, f"a pipelined request failed ({exc})")
            # The answers that came before it failed (a proxy that closes the connection
            # after one): a SASL failure there is the prebind's outcome, not worth a second
            # login (a wrong password must cost one attempt).
            self._raise_sasl_failure(exc.answers)
            if exc.condition != "http-error":  # (timeout, refused connection, closed engine)
                raise
            raise _NoPipelining(exc) from None  # (a connection closed, a garbled answer)
        try:
            conv.absorb(first)
        except BOSHError as exc:  # (e.g. a 400: a server that read both as one request)
            if not _payload_refused(exc):
                raise
            raise _NoPipelining(exc) from None
        answer = conv.take(_IS_SASL_ANSWER)
        if answer is None:  # (a server that checks the proof in the background)
            memory.stop_pipelining(domain, "the first answer did not carry the SASL outcome")
            # (its outcome may be in the second answer: a failure is not tried again)
            self._raise_sasl_failure((second,))
            raise _NoPipelining(None)
        self._check_success(answer, scram)
        try:
            conv.absorb(second)
            bound_features = conv.take(_IS_FEATURES)
            result = conv.take(_iq_result(bind_id))
            if bound_features is None or result is None:
                memory.stop_pipelining(domain, "the restart response did not answer its bind")
                raise _NoPipelining(None)
            # (a bind error is the server's answer to the bind, after a SASL success that came
            # first: nothing pipelining did. ``_finish`` raises it, and the flow takes it as
            # the unpipelined quickstart does: one more try the usual way, not two.)
        except BOSHError as exc:
            if not _payload_refused(exc):
                raise
            raise _NoPipelining(exc) from None
        self._piped = True
        return bound_features, result

    def _raise_sasl_failure(self, answers: Sequence[tuple[int, bytes]]) -> None:
        """Raise the SASL failure the first of ``answers`` that has a SASL outcome carries
        (answers of a pipelined finish that went wrong, before its session is ended)."""
        conv = self._conv
        for status, body in answers:
            try:
                conv.absorb(_new(BOSHResponse, (status, body)))
            except AuthenticationFailed:
                raise
            except BOSHError:
                continue
            outcome = conv.take(_IS_SASL_ANSWER)
            if outcome is not None:
                self._raise_if_failure(outcome)
                return

    def _finish(
        self, bound_features: etree._Element, result: etree._Element, mech: str
    ) -> Flow[PrebindSession]:
        """The bound JID, the legacy session if the server wants it, and the session."""
        conv = self._conv
        jid = self._bound_jid(result)

        # The legacy RFC 3921 session costs a round trip: only when offered and not <optional/>.
        legacy = bound_features.find(_SESSION)
        if legacy is not None and legacy.find(f"{{{b.NS_SESSION}}}optional") is None:
            session_id = f"sess_{secrets.token_hex(4)}"
            session_iq = (
                f"<iq id='{session_id}' type='set' xmlns='{b.NS_CLIENT}'>"
                f"<session xmlns='{b.NS_SESSION}'/></iq>"
            )
            yield from conv.exchange([("session", session_iq)])
            reply = yield from conv.wait_for(_iq_result(session_id), "the session result")
            if reply.get("type") != "result":
                raise ProtocolError("session establishment failed", condition="session-failed")

        attrs = conv.attrs

        def num(name: str) -> int | None:
            try:
                return int(attrs[name])
            except (KeyError, ValueError):
                return None

        return PrebindSession(
            jid=jid,
            sid=conv.sid or "",
            rid=conv.rid,
            service_url=self.service_url,
            wait=num("wait"),
            inactivity=num("inactivity"),
            requests=num("requests"),
            mechanism=mech,
            round_trips=conv.round_trips,
            request_count=conv.request_count,
            polls=conv.polls,
        )

    def _first_message(self, mech: str) -> tuple[ScramClient | None, str]:
        """The SASL client for ``mech`` (SCRAM only) and the ``<auth/>`` that starts it."""
        creds = self.credentials
        scram: ScramClient | None = None
        if mech in SCRAM_HASHES:
            try:
                scram = ScramClient(mech, creds.localpart, creds.password or "")
            except ValueError as exc:
                raise ConfigurationError(f"credentials unusable with SCRAM: {exc}") from None
            payload = _b64encode(scram.client_first())
        elif mech == "PLAIN":
            payload = _b64encode(f"\0{creds.localpart}\0{creds.password}".encode())
        else:  # ANONYMOUS
            return None, f"<auth xmlns='{b.NS_SASL}' mechanism='{mech}'/>"
        return scram, f"<auth xmlns='{b.NS_SASL}' mechanism='{mech}'>{payload}</auth>"

    def _check_success(self, answer: etree._Element, scram: ScramClient | None) -> None:
        """The last SASL answer is a success, and (SCRAM) carries the server's signature."""
        self._raise_if_failure(answer)
        if answer.tag == _CHALLENGE:
            raise ProtocolError(
                "unexpected SASL challenge (server-final must come with <success/>)"
            )
        if scram is not None:
            try:
                server_final = _b64decode(answer.text)
            except ProtocolError:
                # (a garbled signature is a wrong one: ``_payload_refused`` must not take it
                # for a refused quickstart and log in a second time)
                raise ProtocolError(
                    "SCRAM server-final is not valid base64: the server is not who it claims",
                    condition="server-signature-mismatch",
                ) from None
            scram.verify_server_final(server_final)

    @staticmethod
    def _raise_if_failure(answer: etree._Element) -> None:
        if answer.tag == _FAILURE:
            cond = _condition(answer) or "not-authorized"
            raise AuthenticationFailed(f"SASL authentication failed: {cond}", condition=cond)

    @staticmethod
    def _bound_jid(result: etree._Element) -> str:
        if result.get("type") != "result":
            err = result.find(f"{{{b.NS_CLIENT}}}error")
            cond = _condition(err) if err is not None else None
            raise ProtocolError(f"resource binding failed: {cond or 'error'}", condition=cond)
        jid_el = result.find(f"{_BIND}/{{{b.NS_BIND}}}jid")
        if jid_el is None or not (jid_el.text or "").strip():
            raise ProtocolError("bind result carries no JID")
        jid = (jid_el.text or "").strip()
        if not page_safe_jid(jid):
            # (a condition of its own: a server binds the JID of the account it logged in,
            # and where that has a character no page may carry, such as a backtick in a
            # username, that is this user's, not a sick server's: see core._REFUSED_BIND)
            raise ProtocolError(
                "bind result carries a JID no page may carry", condition="unsafe-jid"
            )
        return jid


def probe_flow(domain: str, options: PrebindOptions, *, rid: int | None = None) -> Flow[ServerInfo]:
    """Open a session, read what the server offers, and end it: for ``bosh-middleware check``."""
    conv = _Conversation(domain, options, rid)
    yield from conv.create()
    error: BOSHError | None = None
    info: ServerInfo | None = None
    try:
        features = yield from conv.wait_for(_IS_FEATURES, "stream features")
        info = ServerInfo(
            attrs=dict(conv.attrs),
            mechanisms=_mechanisms(features),
            features=[etree.QName(f).localname for f in features if isinstance(f.tag, str)],
        )
    except BOSHError as exc:
        error = exc
    if conv.sid is not None:
        with contextlib.suppress(BOSHError):
            yield conv.terminate_requests()
    if error is not None:
        raise error
    assert info is not None
    return info


def terminate_flow(session: PrebindSession) -> Flow[None]:
    """End a prebound session that no browser will attach to (frees the server's resources)."""
    body = b.terminate_body(rid=session.rid, sid=session.sid)
    yield [BOSHRequest(rid=session.rid, body=body, label="terminate", best_effort=True)]
