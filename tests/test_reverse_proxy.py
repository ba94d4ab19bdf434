"""The pipelined SCRAM finish against the real Prosody behind a real nginx (the Debian package),
the way most BOSH endpoints are deployed: with nginx's defaults (HTTP/1.0 to the upstream, a new
upstream connection per request) and with the usual BOSH recipe (HTTP/1.1 keep-alive upstream,
no buffering). nginx answers a client's pipelined requests one after another, each proxied in
turn, so a warm SCRAM prebind must keep its 2 round trips there: no redo, pipelining left on,
every session live through nginx. A wrong password costs one SASL attempt there too. Behind an
nginx without client keep-alive (``keepalive_timeout 0``) the pipelined pair cannot work: the
engine redoes the prebind one request at a time and turns pipelining off, and ends each spent
session at once with the RID of the request nginx dropped.

nginx must be installed (tests/support/install-servers.sh): a missing nginx fails these tests.
(The hand-written proxies are in test_pipelining.py; the helper in support/reverse_proxy.py.)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

import httpx
import psutil
import pytest

from bosh_middleware import AsyncPrebinder, Credentials, Prebinder
from bosh_middleware.errors import AuthenticationFailed
from support.reverse_proxy import VARIANTS, AccessEntry, ReverseProxy
from support.xmpp_servers import XMPPServer
from test_prebind_servers import assert_attachable, assert_ended, run_async

WARM_PREBINDS = 5
#: (``max_in_flight=1``: a first prebind sends its restart and bind one after the other, not
#: on two connections next to each other, where the bind can overtake the restart in nginx
#: and the prebind is redone, a race of a few per cent under load that would change every
#: count here; the warm prebinds' pipelined pair, on one connection, is not affected)
OPTS = {
    "mechanisms": ["SCRAM-SHA-1"],
    "transport": "builtin",
    "timeout": 10.0,
    "max_in_flight": 1,
}
#: A SASL message Prosody received (its debug log names each stanza a BOSH session gets).
SASL_RECEIVED = {
    "auth": re.compile(r"Received\[[^\]]*\]: <auth\b[^>]*urn:ietf:params:xml:ns:xmpp-sasl"),
    "response": re.compile(r"Received\[[^\]]*\]: <response\b[^>]*urn:ietf:params:xml:ns:xmpp-sasl"),
}


@pytest.fixture(params=VARIANTS)
def nginx(
    request: pytest.FixtureRequest,
    prosody: XMPPServer,
    nginx_factory: Callable[..., ReverseProxy],
) -> ReverseProxy:
    """A fresh private nginx in front of the session's Prosody (its own access log)."""
    return nginx_factory(prosody.service_url, request.param)


def upstream(prosody: XMPPServer) -> str:
    u = urlsplit(prosody.service_url)
    return f"{u.hostname}:{u.port}"


def assert_proxied(entries: Sequence[AccessEntry], prosody: XMPPServer) -> None:
    """Each request went through nginx to this Prosody, once, and was answered by it (none
    given up by the client before Prosody answered: nginx's 499)."""
    for e in entries:
        assert (e.method, e.uri) == ("POST", "/http-bind"), e
        assert e.upstream_addr == upstream(prosody), e  # (one address: nginx did not retry)
        assert e.upstream_status == str(e.status), e


def sasl_stanzas(prosody: XMPPServer, offset: int) -> dict[str, int]:
    """How many SASL ``<auth/>`` and ``<response/>`` Prosody received after ``offset`` (bytes
    of its log)."""
    with open(prosody.log_path, "rb") as f:
        f.seek(offset)
        text = f.read().decode("utf-8", "replace")
    return {name: len(pattern.findall(text)) for name, pattern in SASL_RECEIVED.items()}


def log_size(prosody: XMPPServer) -> int:
    return prosody.log_path.stat().st_size


# ------------------------------------------------------------------------------------------
# nginx is really there
# ------------------------------------------------------------------------------------------


def test_nginx_is_in_the_path_and_on_loopback_only(prosody, nginx) -> None:
    jid, password = prosody.new_user()
    with Prebinder(nginx.url, **OPTS) as p:
        session = p.prebind(Credentials(jid, password))
        reply = httpx.post(
            nginx.url,
            content=(
                f"<body rid='{session.rid}' sid='{session.sid}' "
                "xmlns='http://jabber.org/protocol/httpbind'><iq type='get' id='r1' "
                "xmlns='jabber:client'><query xmlns='jabber:iq:roster'/></iq></body>"
            ),
            headers={"Content-Type": "text/xml; charset=utf-8"},
            timeout=5,
        )
        assert p.terminate(dataclasses.replace(session, rid=session.rid + 1)) is True
    # nginx answered (it drops the upstream's Server header and sends its own), with
    # Prosody's answer
    assert reply.status_code == 200
    assert reply.headers.get("server", "").startswith("nginx"), reply.headers
    assert b"jabber:iq:roster" in reply.content and b"type='result'" in reply.content
    # every request of the prebind, the roster get and the terminate (5 + 1 + 1), each
    # proxied to Prosody
    assert session.request_count == 5 and session.round_trips == 5  # (cold: learns quickstart)
    entries = nginx.wait_for_entries(session.request_count + 2)
    assert len(entries) == session.request_count + 2, entries
    assert_proxied(entries, prosody)
    # nothing but /http-bind is proxied
    other = httpx.get(nginx.url.replace("/http-bind", "/"), timeout=5)
    assert other.status_code == 404 and other.headers["server"].startswith("nginx")
    # nginx listens on 127.0.0.1:port and nowhere else
    listening = [
        c.laddr
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == nginx.port
    ]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening


# ------------------------------------------------------------------------------------------
# warm SCRAM prebinds: 3 requests in 2 round trips, the last two pipelined through nginx
# ------------------------------------------------------------------------------------------


def prebinds_sync(url: str, creds: Credentials, n: int, domain: str):
    with Prebinder(url, **OPTS) as p:
        first = p.prebind(creds)  # learns quickstart
        first_ended = p.terminate(first)
        sessions = [p.prebind(creds) for _ in range(n)]
        pipelines = p.memory.pipelines(domain)
        live = []
        for s in sessions:
            assert_attachable(s, url)  # roster get with s.rid, through nginx
            # the roster get used s.rid: the terminate goes with the next one
            live.append(p.terminate(dataclasses.replace(s, rid=s.rid + 1)))
    return first, first_ended, sessions, pipelines, live


def prebinds_async(url: str, creds: Credentials, n: int, domain: str):
    async def go():
        async with AsyncPrebinder(url, **OPTS) as p:
            first = await p.prebind(creds)
            first_ended = await p.terminate(first)
            sessions = [await p.prebind(creds) for _ in range(n)]
            pipelines = p.memory.pipelines(domain)
            live = []
            for s in sessions:
                assert_attachable(s, url)  # (blocks the loop a moment: nothing else runs)
                live.append(await p.terminate(dataclasses.replace(s, rid=s.rid + 1)))
            return first, first_ended, sessions, pipelines, live

    return run_async(go)


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_warm_scram_prebinds_pipeline_through_nginx(prosody, nginx, driver) -> None:
    jid, password = prosody.new_user()
    creds = Credentials(jid, password)
    run = prebinds_sync if driver == "sync" else prebinds_async
    first, first_ended, sessions, pipelines, ended = run(
        nginx.url, creds, WARM_PREBINDS, prosody.domain
    )

    assert first_ended is True and not first.retried
    shape = [(s.round_trips, s.request_count, s.retried) for s in sessions]
    assert shape == [(2, 3, False)] * WARM_PREBINDS, nginx.error_log_text()
    assert pipelines, "pipelining was turned off behind nginx"
    assert all(s.service_url == nginx.url and s.mechanism == "SCRAM-SHA-1" for s in sessions)
    assert len({s.sid for s in sessions}) == WARM_PREBINDS
    assert len({s.jid for s in sessions}) == WARM_PREBINDS
    assert all(s.jid.split("/")[0] == jid for s in sessions)
    assert ended == [True] * WARM_PREBINDS

    # ended at Prosody: a request with the next RID finds no session (through nginx)
    for s in sessions:
        assert_ended(nginx.url, s.sid, s.rid + 2)

    # nginx's access log: the learning prebind and its terminate, then 3 requests per warm
    # prebind, then per session a roster get, a terminate and the check above; all proxied
    warm = first.request_count + 1
    expected = warm + 3 * WARM_PREBINDS + 3 * WARM_PREBINDS
    entries = nginx.wait_for_entries(expected)
    assert len(entries) == expected, entries
    assert_proxied(entries, prosody)
    assert all(e.status == 200 for e in entries[: warm + 5 * WARM_PREBINDS])  # (not the checks)
    # each warm prebind: creation, then SCRAM's last step and the restart + bind back to back
    # on one client connection, which nginx found already read behind the first ("p")
    for k in range(WARM_PREBINDS):
        _create, final, restart_bind = entries[warm + 3 * k : warm + 3 * k + 3]
        assert restart_bind.connection == final.connection, (final, restart_bind)
        assert restart_bind.connection_requests == final.connection_requests + 1
        assert restart_bind.pipe == "p", (final, restart_bind)


# ------------------------------------------------------------------------------------------
# a wrong password: one SASL attempt, AuthenticationFailed, pipelining left on
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_wrong_password_through_nginx_is_tried_once(prosody, nginx, driver) -> None:
    jid, password = prosody.new_user()
    attempts = 2
    counts: list[dict[str, int]] = []

    def go_sync():
        errors = []
        with Prebinder(nginx.url, **OPTS) as p:
            assert p.terminate(p.prebind(Credentials(jid, password)))  # learns (quickstart)
            for _ in range(attempts):
                offset = log_size(prosody)
                with pytest.raises(AuthenticationFailed) as info:
                    p.prebind(Credentials(jid, "wrong-" + password))
                errors.append(info.value)
                counts.append(sasl_stanzas(prosody, offset))
            return errors, p.memory.pipelines(prosody.domain)

    async def go_async():
        errors = []
        async with AsyncPrebinder(nginx.url, **OPTS) as p:
            assert await p.terminate(await p.prebind(Credentials(jid, password)))
            for _ in range(attempts):
                offset = log_size(prosody)
                with pytest.raises(AuthenticationFailed) as info:
                    await p.prebind(Credentials(jid, "wrong-" + password))
                errors.append(info.value)
                counts.append(sasl_stanzas(prosody, offset))
            return errors, p.memory.pipelines(prosody.domain)

    errors, pipelines = go_sync() if driver == "sync" else run_async(go_async)
    assert [e.condition for e in errors] == ["not-authorized"] * attempts
    # Prosody got one SCRAM exchange per wrong-password prebind: one <auth/> (with the
    # creation request) and one <response/> (SCRAM's last step): no redo
    assert counts == [{"auth": 1, "response": 1}] * attempts, counts
    assert pipelines, "a wrong password turned pipelining off"
    # through nginx: the learning prebind (5) and its terminate, then per wrong password the
    # creation, the pipelined pair and the terminate of the failed session
    entries = nginx.wait_for_entries(6 + 4 * attempts)
    assert len(entries) == 6 + 4 * attempts, entries
    assert_proxied(entries, prosody)
    for k in range(attempts):
        _create, final, restart_bind, _end = entries[6 + 4 * k : 6 + 4 * k + 4]
        assert restart_bind.connection == final.connection
        assert restart_bind.connection_requests == final.connection_requests + 1


# ------------------------------------------------------------------------------------------
# nginx without client keep-alive: the pipelined pair cannot work; the engine notices
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_nginx_without_client_keepalive_turns_pipelining_off(
    prosody, nginx_factory, driver
) -> None:
    """``keepalive_timeout 0``: nginx answers SCRAM's last step, closes the connection and
    drops the restart + bind pipelined behind it. A wrong password still costs one SASL
    attempt (its failure is in the answer that came); a right one has its session ended and
    is redone one request at a time, live, and pipelining goes off for the domain."""
    proxy = nginx_factory(prosody.service_url, "no-keepalive")
    jid, password = prosody.new_user()
    creds = Credentials(jid, password)

    def go_sync():
        with Prebinder(proxy.url, **OPTS) as p:
            assert p.terminate(p.prebind(creds))  # learns (quickstart)
            offset = log_size(prosody)
            with pytest.raises(AuthenticationFailed) as info:
                p.prebind(Credentials(jid, "wrong-" + password))
            wrong = (info.value, sasl_stanzas(prosody, offset), p.memory.pipelines(prosody.domain))
            redone = p.prebind(creds)  # finds out
            after = p.prebind(creds)
            for s in (redone, after):
                assert_attachable(s, proxy.url)
                assert p.terminate(dataclasses.replace(s, rid=s.rid + 1))
            return wrong, redone, after, p.memory.pipelines(prosody.domain)

    async def go_async():
        async with AsyncPrebinder(proxy.url, **OPTS) as p:
            assert await p.terminate(await p.prebind(creds))
            offset = log_size(prosody)
            with pytest.raises(AuthenticationFailed) as info:
                await p.prebind(Credentials(jid, "wrong-" + password))
            wrong = (info.value, sasl_stanzas(prosody, offset), p.memory.pipelines(prosody.domain))
            redone = await p.prebind(creds)
            after = await p.prebind(creds)
            for s in (redone, after):
                assert_attachable(s, proxy.url)
                assert await p.terminate(dataclasses.replace(s, rid=s.rid + 1))
            return wrong, redone, after, p.memory.pipelines(prosody.domain)

    (error, counts, still_on), redone, after, pipelines = (
        go_sync() if driver == "sync" else run_async(go_async)
    )
    assert error.condition == "not-authorized"
    assert counts == {"auth": 1, "response": 1}, counts
    assert still_on  # (a wrong password says nothing about pipelining)
    assert not pipelines
    assert redone.sid != after.sid
    assert redone.request_count > 3  # (the pipelined attempt, then one at a time)
    # one request at a time from then on: quickstart's creation, SCRAM's last step, restart
    assert (after.round_trips, after.request_count, after.retried) == (3, 3, False)
    entries = proxy.entries()
    # (each session that lost its restart + bind is ended with that request's RID: nothing
    # held by Prosody, nothing given up by the engine; see the next test)
    assert_proxied(entries, prosody)
    assert all(e.connection_requests == 1 for e in entries)  # (no keep-alive: one each)


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_a_session_spent_behind_nginx_without_keepalive_is_ended_at_once(
    prosody, nginx_factory, driver
) -> None:
    """nginx drops the restart + bind pipelined behind the first request. The spent session
    (a wrong password's, and the one redone one request at a time) is ended with the dropped
    request's RID, which Prosody expects: answered at once, not held for a missing RID until
    the engine gives up on its cleanup (nginx's 499) while the session lives on."""
    proxy = nginx_factory(prosody.service_url, "no-keepalive")
    jid, password = prosody.new_user()

    def go_sync() -> None:
        with Prebinder(proxy.url, **OPTS) as p:
            assert p.terminate(p.prebind(Credentials(jid, password)))  # learns (quickstart)
            with pytest.raises(AuthenticationFailed):
                p.prebind(Credentials(jid, "wrong-" + password))
            assert p.terminate(p.prebind(Credentials(jid, password)))  # finds out: redone

    async def go_async() -> None:
        async with AsyncPrebinder(proxy.url, **OPTS) as p:
            assert await p.terminate(await p.prebind(Credentials(jid, password)))
            with pytest.raises(AuthenticationFailed):
                await p.prebind(Credentials(jid, "wrong-" + password))
            assert await p.terminate(await p.prebind(Credentials(jid, password)))

    offset = log_size(prosody)
    go_sync() if driver == "sync" else run_async(go_async)
    entries = proxy.entries()
    assert not [e for e in entries if e.status == 499], entries
    assert_proxied(entries, prosody)
    with open(prosody.log_path, "rb") as f:
        f.seek(offset)
        text = f.read().decode("utf-8", "replace")
    assert "deferring this request" not in text
