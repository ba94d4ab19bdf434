"""The engine against real XMPP servers configured as sites configure them, beyond the shared
fixtures' settings: each test starts its own server (bounded, few: seconds each)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from bosh_middleware import (
    AsyncPrebinder,
    AuthenticationFailed,
    Credentials,
    Prebinder,
    ServiceUnavailable,
    core,
)
from support.xmpp_servers import XMPPServer, start_ejabberd


@pytest.fixture
def ejabberd_fail2ban(tmp_path: Path) -> Iterator[XMPPServer]:
    """ejabberd with mod_fail2ban (in ejabberd's example configuration, banning an address
    after 20 failed logins in an hour; after one here): the web server's address, which every
    prebind comes from."""
    srv = start_ejabberd(
        tmp_path / "ejabberd",
        modules="  mod_fail2ban:\n    c2s_max_auth_failures: 1\n",
    )
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.ejabberd
def test_ejabberd_banning_the_web_servers_address_is_a_refusal(
    ejabberd_fail2ban: XMPPServer,
) -> None:
    """Once banned, ejabberd refuses every session at creation with a stream error (in a
    body that declares ``xmlns:stream`` twice): a policy-violation, this address's refusal by
    a server that is up (not counted towards the breaker), not a malformed response."""
    srv = ejabberd_fail2ban
    jid, password = srv.new_user()
    with Prebinder(srv.service_url, quickstart=False) as prebinder:
        # (refused, and the ban's stream error in the same answer)
        with pytest.raises((AuthenticationFailed, ServiceUnavailable)):
            prebinder.prebind(Credentials(jid, "wrong"))
        with pytest.raises(ServiceUnavailable) as info:
            prebinder.prebind(Credentials(jid, password))
    assert info.value.condition == "policy-violation"
    assert core._refused(info.value)

    async def run() -> None:
        async with AsyncPrebinder(srv.service_url) as prebinder:
            with pytest.raises(ServiceUnavailable) as info:
                await prebinder.prebind(Credentials(jid, password))
        assert info.value.condition == "policy-violation"

    asyncio.run(run())
