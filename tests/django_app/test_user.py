"""Whose session a page gets, sync (the test Client) and async (AsyncClient).

* The user is read again after the view: a view that logs the user out (or someone else in)
  must not hand out the session started for them before it, and that session must not stay
  live on the XMPP server; whoever the view logs in, from an anonymous request too, gets theirs.
* The user is ``request.user`` as the middleware above ours left it, in both modes: async mode
  must not ask ``request.auser()``, which keeps answering whom AuthenticationMiddleware loaded
  (or the AnonymousUser that RemoteUserMiddleware's async path made it cache).
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.middleware import RemoteUserMiddleware
from django.test import AsyncClient, Client

from django_app.helpers import (
    PAGE_HEADERS,
    Account,
    RecordingCore,
    assert_dead,
    assert_live,
    injected,
    make_account,
)
from django_app.settings import MIDDLEWARE
from support.xmpp_servers import XMPPServer

pytestmark = pytest.mark.django_db(transaction=True)

OURS = "bosh_middleware.django.BOSHPrebindMiddleware"


def logged_in(account: Account) -> Client:
    client = Client()
    client.force_login(account.user)
    return client


async def alogged_in(account: Account) -> AsyncClient:
    client = AsyncClient()
    await sync_to_async(client.force_login)(account.user)
    return client


def above_ours(settings: Any, middleware: str) -> None:
    i = MIDDLEWARE.index(OURS)
    settings.MIDDLEWARE = [*MIDDLEWARE[:i], middleware, *MIDDLEWARE[i:]]


def bob(bosh: XMPPServer) -> Account:
    return make_account(bosh, f"bob{secrets.token_hex(3)}")


def ended_unused(cores: list[RecordingCore], bosh: XMPPServer) -> None:
    """The one prebind started (next to the view) was ended unused: dead at the server."""
    [pending] = cores[0].pendings
    session = pending._future.result(timeout=10)
    cores[0].drain()  # waits for the termination
    assert_dead(bosh.service_url, session.sid, session.rid)


async def aended_unused(acores: list[RecordingCore], bosh: XMPPServer) -> None:
    [pending] = acores[0].pendings
    session = await pending._task
    await acores[0].adrain()
    assert_dead(bosh.service_url, session.sid, session.rid)


# --- the view logs the user out, or someone else in ----------------------------------------


@pytest.mark.parametrize("path", ["/bye/", "/abye/"])
def test_logged_out_by_the_view_gets_no_session(
    alice: Account, bosh: XMPPServer, cores: list[RecordingCore], path: str
) -> None:
    client = logged_in(alice)
    r = client.get(path, headers=PAGE_HEADERS)
    assert r.status_code == 200 and b"logged out" in r.content and b"BOSH_" not in r.content
    assert b"BOSH_" not in client.get("/page/", headers=PAGE_HEADERS).content
    ended_unused(cores, bosh)  # the prebind started for alice next to the view


@pytest.mark.parametrize("path", ["/bye/", "/abye/"])
async def test_logged_out_by_the_view_gets_no_session_async(
    alice: Account, bosh: XMPPServer, acores: list[RecordingCore], path: str
) -> None:
    client = await alogged_in(alice)
    r = await client.get(path, headers=PAGE_HEADERS)
    assert r.status_code == 200 and b"logged out" in r.content and b"BOSH_" not in r.content
    assert b"BOSH_" not in (await client.get("/page/", headers=PAGE_HEADERS)).content
    await aended_unused(acores, bosh)


# --- the view says its page carries no session ----------------------------------------------


@pytest.mark.parametrize("path", ["/quiet/", "/aquiet/"])
def test_a_page_whose_view_says_no_prebind_is_untouched(
    alice: Account, bosh: XMPPServer, cores: list[RecordingCore], path: str
) -> None:
    r = logged_in(alice).get(path, headers=PAGE_HEADERS)
    assert r.status_code == 200 and b"no session" in r.content and b"BOSH_" not in r.content
    assert r.get("Cache-Control") is None
    ended_unused(cores, bosh)  # the prebind started for alice next to the view


@pytest.mark.parametrize("path", ["/quiet/", "/aquiet/"])
async def test_a_page_whose_view_says_no_prebind_is_untouched_async(
    alice: Account, bosh: XMPPServer, acores: list[RecordingCore], path: str
) -> None:
    r = await (await alogged_in(alice)).get(path, headers=PAGE_HEADERS)
    assert r.status_code == 200 and b"no session" in r.content and b"BOSH_" not in r.content
    assert r.get("Cache-Control") is None
    await aended_unused(acores, bosh)


@pytest.mark.parametrize("path", ["/switch/", "/aswitch/"])
def test_view_logging_someone_else_in_gets_their_session(
    alice: Account, bosh: XMPPServer, cores: list[RecordingCore], path: str
) -> None:
    other = bob(bosh)
    r = logged_in(alice).get(f"{path}?to={other.username}", headers=PAGE_HEADERS)
    found = injected(r.content)
    assert found.jid.split("/")[0] == other.jid
    assert_live(bosh.service_url, found.sid, found.rid)
    alices, bobs = cores[0].pendings
    assert (alices.credentials.jid, bobs.credentials.jid) == (alice.jid, other.jid)
    session = alices._future.result(timeout=10)
    cores[0].drain()
    assert_dead(bosh.service_url, session.sid, session.rid)


@pytest.mark.parametrize("path", ["/switch/", "/aswitch/"])
async def test_view_logging_someone_else_in_gets_their_session_async(
    alice: Account, bosh: XMPPServer, acores: list[RecordingCore], path: str
) -> None:
    other = await sync_to_async(bob)(bosh)
    client = await alogged_in(alice)
    r = await client.get(f"{path}?to={other.username}", headers=PAGE_HEADERS)
    found = injected(r.content)
    assert found.jid.split("/")[0] == other.jid
    assert_live(bosh.service_url, found.sid, found.rid)
    alices, bobs = acores[0].pendings
    assert (alices.credentials.jid, bobs.credentials.jid) == (alice.jid, other.jid)
    session = await alices._task
    await acores[0].adrain()
    assert_dead(bosh.service_url, session.sid, session.rid)


@pytest.mark.parametrize("path", ["/switch/", "/aswitch/"])
def test_view_logging_in_an_anonymous_visitor_gets_their_session(
    alice: Account, bosh: XMPPServer, cores: list[RecordingCore], path: str
) -> None:
    """A magic link: the request comes anonymous, the view logs alice in and renders a page
    (no redirect). The page carries her session, prebound after the view."""
    client = Client()
    assert b"BOSH_" not in client.get("/page/", headers=PAGE_HEADERS).content
    r = client.get(f"{path}?to={alice.username}", headers=PAGE_HEADERS)
    found = injected(r.content)
    assert found.jid.split("/")[0] == alice.jid
    assert_live(bosh.service_url, found.sid, found.rid)
    [pending] = cores[0].pendings  # one prebind only, after the view: none for the anonymous
    assert pending.credentials.jid == alice.jid


@pytest.mark.parametrize("path", ["/switch/", "/aswitch/"])
async def test_view_logging_in_an_anonymous_visitor_gets_their_session_async(
    alice: Account, bosh: XMPPServer, acores: list[RecordingCore], path: str
) -> None:
    client = AsyncClient()
    assert b"BOSH_" not in (await client.get("/page/", headers=PAGE_HEADERS)).content
    r = await client.get(f"{path}?to={alice.username}", headers=PAGE_HEADERS)
    found = injected(r.content)
    assert found.jid.split("/")[0] == alice.jid
    assert_live(bosh.service_url, found.sid, found.rid)
    [pending] = acores[0].pendings
    assert pending.credentials.jid == alice.jid


# --- request.user set by a middleware above ours -------------------------------------------


#: A middleware that sets ``request.user`` to the user itself, and one that sets a lazy object
#: of its own (sync only, as token-auth middlewares often are).
ACT_AS = ["django_app.middleware.ActAs", "django_app.middleware.lazy_act_as"]


@pytest.mark.parametrize("act_as", ACT_AS)
@pytest.mark.parametrize("path", ["/page/", "/bosh/prebind"])
def test_user_set_by_a_middleware_above(
    alice: Account, bosh: XMPPServer, settings: Any, path: str, act_as: str
) -> None:
    """Alice is logged in; a middleware above ours made ``request.user`` bob."""
    above_ours(settings, act_as)
    other = bob(bosh)
    r = logged_in(alice).get(path, headers={**PAGE_HEADERS, "X-Act-As": other.username})
    jid = r.json()["jid"] if path == "/bosh/prebind" else injected(r.content).jid
    assert jid.split("/")[0] == other.jid


@pytest.mark.parametrize("act_as", ACT_AS)
@pytest.mark.parametrize("path", ["/page/", "/apage/", "/bosh/prebind"])
async def test_user_set_by_a_middleware_above_async(
    alice: Account,
    bosh: XMPPServer,
    settings: Any,
    acores: list[RecordingCore],
    path: str,
    act_as: str,
) -> None:
    """A lazy ``request.user`` of another middleware's is that middleware's user, not the one
    ``request.auser()`` loads for AuthenticationMiddleware."""
    above_ours(settings, act_as)
    other = await sync_to_async(bob)(bosh)
    client = await alogged_in(alice)
    r = await client.get(path, headers={**PAGE_HEADERS, "X-Act-As": other.username})
    jid = r.json()["jid"] if path == "/bosh/prebind" else injected(r.content).jid
    assert jid.split("/")[0] == other.jid


REMOTE_USER = "django.contrib.auth.middleware.RemoteUserMiddleware"
REMOTE_BACKENDS = ["django.contrib.auth.backends.RemoteUserBackend"]


def test_remote_user(alice: Account, bosh: XMPPServer, settings: Any) -> None:
    above_ours(settings, REMOTE_USER)
    settings.AUTHENTICATION_BACKENDS = REMOTE_BACKENDS
    r = Client().get("/page/", headers=PAGE_HEADERS, REMOTE_USER=alice.username)
    found = injected(r.content)
    assert found.jid.split("/")[0] == alice.jid
    assert_live(bosh.service_url, found.sid, found.rid)


@pytest.mark.skipif(
    not hasattr(RemoteUserMiddleware, "aprocess_request"), reason="Django < 5.2: sync only"
)
async def test_remote_user_async(
    alice: Account, bosh: XMPPServer, settings: Any, acores: list[RecordingCore]
) -> None:
    """Django's async RemoteUserMiddleware awaits ``auser()`` (caching the AnonymousUser of a
    first request) before it sets ``request.user``. Under ASGI it reads the ``Remote-User``
    header."""
    above_ours(settings, REMOTE_USER)
    settings.AUTHENTICATION_BACKENDS = REMOTE_BACKENDS
    r = await AsyncClient().get("/page/", headers={**PAGE_HEADERS, "Remote-User": alice.username})
    found = injected(r.content)
    assert found.jid.split("/")[0] == alice.jid
    assert_live(bosh.service_url, found.sid, found.rid)
