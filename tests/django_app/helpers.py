"""Helpers for the Django tests: a PrebindCore that records its prebinds, test accounts, and
reading/proving the injected session."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from concurrent.futures import wait
from dataclasses import dataclass
from typing import Any

import httpx
from lxml import etree

from bosh_middleware.core import AsyncPending, PrebindCore, SyncPending
from bosh_middleware.credentials import Credentials
from django_app import accounts
from support.xmpp_servers import XMPPServer

NS_BOSH = "http://jabber.org/protocol/httpbind"
SNIPPET = re.compile(
    r'<script(?: nonce="(?P<nonce>[^"]*)")?>var BOSH_JID=(?P<jid>"[^"]*"),'
    r'BOSH_SID=(?P<sid>"[^"]*"),BOSH_RID=(?P<rid>\d+);</script>'
)
#: What a browser navigation sends.
PAGE_HEADERS = {"Accept": "text/html,application/xhtml+xml", "Sec-Fetch-Dest": "document"}
# --- the prebind cores the middleware makes ------------------------------------------------


class RecordingCore(PrebindCore):
    """Remembers each prebind it starts (and when), so a test can drain them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pendings: list[SyncPending | AsyncPending] = []
        self.started: list[float] = []

    def start_sync(self, credentials: Credentials) -> SyncPending | None:
        self.started.append(time.monotonic())
        pending = super().start_sync(credentials)
        if pending is not None:
            self.pendings.append(pending)
        return pending

    def start_async(self, credentials: Credentials) -> AsyncPending | None:
        self.started.append(time.monotonic())
        pending = super().start_async(credentials)
        if pending is not None:
            self.pendings.append(pending)
        return pending

    async def adrain(self) -> None:
        """Wait for the async prebinds, the terminations of discarded ones; close the client."""
        tasks = [p._task for p in self.pendings if isinstance(p, AsyncPending)]
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(3):
            await asyncio.sleep(0)  # done callbacks schedule the terminations
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.aclose()

    def drain(self) -> None:
        wait([p._future for p in self.pendings if isinstance(p, SyncPending)], timeout=15)
        if self._executor is not None:
            self._executor.shutdown(wait=True)  # terminations of discarded sessions
        self.close()


@dataclass
class Account:
    user: Any
    username: str
    password: str
    jid: str
    xmpp_password: str


def make_account(server: XMPPServer, username: str, *, xmpp: bool = True) -> Account:
    from django.contrib.auth import get_user_model

    password = secrets.token_urlsafe(12)
    user = get_user_model().objects.create_user(username, password=password)
    jid, xmpp_password = server.new_user(username[:8]) if xmpp else ("", "")
    if xmpp:
        accounts.ACCOUNTS[username] = (jid, xmpp_password)
    return Account(user, username, password, jid, xmpp_password)


def page_of(account: Account) -> bytes:
    """What ``views.page`` answers ``account``, as it left the view."""
    from django_app import views

    return (views.HEAD + views.BODY.format(name=account.username, pad="x" * 300)).encode()


# --- reading and proving the injected session ----------------------------------------------


@dataclass
class Injected:
    jid: str
    sid: str
    rid: int
    nonce: str | None


def injected(body: bytes | str) -> Injected:
    """The one injected snippet, which must sit right before the first ``</head>``."""
    text = body.decode() if isinstance(body, bytes) else body
    found = list(SNIPPET.finditer(text))
    assert len(found) == 1, f"expected one BOSH snippet, found {len(found)} in {text[:600]!r}"
    m = found[0]
    assert text[m.end() : m.end() + 7].lower() == "</head>", text
    return Injected(json.loads(m["jid"]), json.loads(m["sid"]), int(m["rid"]), m["nonce"])


def assert_live(service_url: str, sid: str, rid: int, *, timeout: float = 10) -> None:
    """One BOSH request with this sid/rid carrying a roster get must be answered with a result
    (a wrong RID gives a replayed old answer or none, see prebind-facts.md)."""
    iq_id = f"roster_{secrets.token_hex(4)}"
    body = (
        f"<body rid='{rid}' sid='{sid}' xmlns='{NS_BOSH}'>"
        f"<iq type='get' id='{iq_id}' xmlns='jabber:client'>"
        "<query xmlns='jabber:iq:roster'/></iq></body>"
    )
    r = httpx.post(
        service_url,
        content=body,
        timeout=timeout,
        headers={"Content-Type": "text/xml; charset=utf-8"},
    )
    assert r.status_code == 200, r.text
    iqs = [el for el in etree.fromstring(r.content) if el.get("id") == iq_id]
    assert iqs and iqs[0].get("type") == "result", r.text


def assert_dead(service_url: str, sid: str, rid: int) -> None:
    """The session is gone: the server answers a terminate (or an HTTP error), not stanzas."""
    body = (
        f"<body rid='{rid}' sid='{sid}' xmlns='{NS_BOSH}'><iq type='get' id='r1' "
        "xmlns='jabber:client'><query xmlns='jabber:iq:roster'/></iq></body>"
    )
    r = httpx.post(
        service_url, content=body, timeout=10, headers={"Content-Type": "text/xml; charset=utf-8"}
    )
    assert r.status_code != 200 or etree.fromstring(r.content).get("type") == "terminate", r.text


def assert_page_for_request_kind(
    r: Any, kind: str, alice: Account, bosh: XMPPServer, cores: list[Any], looked_up: Any
) -> None:
    """``/page/`` as ``REQUEST_KINDS[kind]`` asked for it: a navigation gets a live session, no-store
    and one credentials lookup; a script's request gets the view's response untouched (body,
    length, validators, no Cache-Control), with no prebind started and no lookup."""
    assert r.status_code == 200
    if kind == "navigation":
        found = injected(r.content)
        assert r["Cache-Control"] == "private, no-store"
        assert len(cores[0].started) == 1 and len(looked_up.calls) == 1
        assert_live(bosh.service_url, found.sid, found.rid)
    else:
        assert r.content == page_of(alice)
        assert int(r["Content-Length"]) == len(r.content)
        assert r["ETag"] == '"page-v1"' and "Expires" in r and "Cache-Control" not in r
        assert cores[0].started == [] and looked_up.calls == []
