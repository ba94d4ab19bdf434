"""The engine against real XMPP servers configured as sites configure them, beyond the shared
fixtures' settings: each test starts its own server (bounded, few: seconds each)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bosh_middleware import (
    AsyncPrebinder,
    AuthenticationFailed,
    BOSHError,
    Credentials,
    MechanismUnavailable,
    Prebinder,
    ServiceUnavailable,
    StaticCredentials,
    cli,
    core,
    wsgi,
)
from support.asgi_recorder import NAV, call_wsgi, wsgi_environ
from support.xmpp_servers import XMPPServer, start_ejabberd, start_prosody

PAGE = b"<html><head><title>t</title></head><body>page</body></html>"


@pytest.fixture
def ejabberd_fail2ban(tmp_path: Path) -> Iterator[XMPPServer]:
    """ejabberd with mod_fail2ban (in ejabberd's example configuration, banning an address
    after 20 failed logins in an hour; after two here): the web server's address, which every
    prebind comes from."""
    srv = start_ejabberd(
        tmp_path / "ejabberd",
        modules="  mod_fail2ban:\n    c2s_max_auth_failures: 2\n",
    )
    try:
        yield srv
    finally:
        srv.stop()


#: Session creations tried against a banned address before its policy-violation must have
#: come (see below: about one in forty is answered otherwise).
_BANNED_TRIES = 5


@pytest.mark.ejabberd
def test_ejabberd_banning_the_web_servers_address_is_a_refusal(
    ejabberd_fail2ban: XMPPServer,
) -> None:
    """Once banned, ejabberd refuses every session at creation with a stream error (in a
    body that declares ``xmlns:stream`` twice): a policy-violation, this address's refusal by
    a server that is up (not counted towards the breaker), not a malformed response.

    ejabberd 23.01 answers about one banned creation in forty (40 in a row, measured by hand
    after a ban) with a bare ``<body type='terminate' condition='item-not-found'/>`` instead:
    its session process is gone before the stream error reaches the answer. No session comes
    of it either; the engine reports it as ``item-not-found``, which counts towards the
    breaker (left so: the engine cannot tell that race from a server that lost its session
    table). So each prebind here is tried a few times, every try must fail, and the
    policy-violation must come."""
    srv = ejabberd_fail2ban
    jid, password = srv.new_user()
    with Prebinder(srv.service_url, quickstart=False) as prebinder:
        with pytest.raises(AuthenticationFailed):
            prebinder.prebind(Credentials(jid, "wrong"))
        # (the ban: ejabberd ends the stream as it refuses the login, and the answer to the
        # request in flight is whatever that race makes of it)
        with pytest.raises(BOSHError):
            prebinder.prebind(Credentials(jid, "wrong"))
        seen: list[str | None] = []
        for _ in range(_BANNED_TRIES):
            with pytest.raises(BOSHError) as raised:
                prebinder.prebind(Credentials(jid, password))
            seen.append(getattr(raised.value, "condition", None))
            if seen[-1] == "policy-violation":
                break
    assert seen[-1] == "policy-violation", seen
    assert isinstance(raised.value, ServiceUnavailable) and core._refused(raised.value)

    async def run() -> list[str | None]:
        seen: list[str | None] = []
        async with AsyncPrebinder(srv.service_url) as prebinder:
            for _ in range(_BANNED_TRIES):
                with pytest.raises(BOSHError) as raised:
                    await prebinder.prebind(Credentials(jid, password))
                seen.append(getattr(raised.value, "condition", None))
                if seen[-1] == "policy-violation":
                    break
        return seen

    seen = asyncio.run(run())
    assert seen[-1] == "policy-violation", seen


def test_prosody_offering_no_mechanism_over_plain_http_is_logged_with_its_cause(
    tmp_path: Path, caplog: Any
) -> None:
    """Prosody's defaults (c2s_require_encryption, no consider_bosh_secure) offer no SASL
    mechanism over plain HTTP, where the web server reaches it on loopback behind a TLS
    proxy: the page is served, and the log says so (no mechanism offered), not that the
    user's login was refused, which nothing tried."""
    srv = start_prosody(tmp_path / "prosody", settings={"c2s_require_encryption": "true"})
    try:
        jid, password = srv.new_user("alice")

        def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            start_response("200 OK", [("Content-Type", "text/html")])
            return [PAGE]

        mw = wsgi.BOSHPrebindMiddleware(
            app,
            service_url=srv.service_url,
            credentials=StaticCredentials({"alice": (jid, password)}),
        )
        caplog.set_level(logging.WARNING, logger="bosh_middleware")
        r = call_wsgi(mw, wsgi_environ("/", headers=NAV, user="alice"))
        assert (r.code, r.body) == (200, PAGE)
        assert f"BOSH prebind misconfigured for {jid}: no usable SASL mechanism" in caplog.text
        assert "server offers []" in caplog.text
        assert "login refused" not in caplog.text
        assert mw.core.breaker.state == "closed"
        mw.core.close()
    finally:
        srv.stop()


def test_prosody_offering_no_mechanism_over_plain_http_says_what_to_do(
    tmp_path: Path, capsys: Any
) -> None:
    """The same server: the engine's error and ``check``'s warning name the likely cause and
    its remedies (not a wrong domain, which Prosody refuses with improper-addressing), and the
    header remedy works: Prosody trusts a loopback peer's X-Forwarded-Proto by default."""
    srv = start_prosody(tmp_path / "prosody", settings={"c2s_require_encryption": "true"})
    try:
        jid, password = srv.new_user("alice")
        with Prebinder(srv.service_url) as prebinder, pytest.raises(MechanismUnavailable) as info:
            prebinder.prebind(Credentials(jid, password))
        assert "consider_bosh_secure" in str(info.value)
        assert "X-Forwarded-Proto" in str(info.value)

        assert cli.main(["check", srv.service_url, "--domain", srv.domain, "--json"]) == 0
        warnings = json.loads(capsys.readouterr().out)["warnings"]
        (said,) = [w for w in warnings if "no SASL mechanisms" in w]
        assert "consider_bosh_secure" in said and "wrong domain" not in said

        headers = {"X-Forwarded-Proto": "https"}
        with Prebinder(srv.service_url, headers=headers) as prebinder:
            session = prebinder.prebind(Credentials(jid, password))
            prebinder.terminate(session)
        assert session.jid.startswith(f"{jid}/")
    finally:
        srv.stop()
