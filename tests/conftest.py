"""Shared pytest fixtures. Add new fixtures in their own clearly marked section."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator

import pytest

from support.reverse_proxy import ReverseProxy, start_nginx
from support.xmpp_servers import XMPPServer, start_ejabberd, start_prosody

# ===========================================================================
# Real XMPP servers (tests/support/xmpp_servers.py)
#   prosody          session: Prosody 0.12, consider_bosh_secure=false, SCRAM only
#   prosody_secure   session: Prosody 0.12, consider_bosh_secure=true, PLAIN + SCRAM
#   ejabberd         session: ejabberd 23.01, PLAIN + SCRAM, CORS headers
#   prosody_factory  function: () -> fresh private Prosody, stopped at test end
# All listen on 127.0.0.1 only; config/data/logs under tmp_path_factory.
# ===========================================================================


def _need(binary: str) -> None:
    if shutil.which(binary, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
        # A missing server is a broken set-up, not a reason to skip: fail loudly.
        pytest.fail(f"{binary} is not installed (run: bash tests/support/install-servers.sh)")


@pytest.fixture(scope="session")
def prosody(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XMPPServer]:
    _need("prosody")
    srv = start_prosody(tmp_path_factory.mktemp("prosody"), secure=False)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def prosody_secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XMPPServer]:
    _need("prosody")
    srv = start_prosody(tmp_path_factory.mktemp("prosody-secure"), secure=True)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def ejabberd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XMPPServer]:
    _need("ejabberdctl")
    srv = start_ejabberd(tmp_path_factory.mktemp("ejabberd"))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def prosody_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., XMPPServer]]:
    """``factory(secure=False, password_hash="SHA-1") -> XMPPServer``: a fresh private
    Prosody per call."""
    _need("prosody")
    started: list[XMPPServer] = []

    def factory(*, secure: bool = False, password_hash: str = "SHA-1") -> XMPPServer:
        srv = start_prosody(
            tmp_path_factory.mktemp("prosody-private"), secure=secure, password_hash=password_hash
        )
        started.append(srv)
        return srv

    try:
        yield factory
    finally:
        for srv in started:
            srv.stop()


@pytest.fixture
def pbkdf2_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bytes, int]]:
    """Counts the PBKDF2 derivations scram.py performs (all go through its
    ``salted_password``), as (hash name, salt, iterations): what the salted-password cache is
    to spare."""
    from bosh_middleware import scram

    calls: list[tuple[str, bytes, int]] = []
    real = scram.salted_password

    def counting(name: str, password: bytes, salt: bytes, iterations: int) -> bytes:
        calls.append((name, salt, iterations))
        return real(name, password, salt, iterations)

    monkeypatch.setattr(scram, "salted_password", counting)
    return calls


# ===========================================================================
# (end of XMPP server fixtures)
# ===========================================================================


# ===========================================================================
# Reverse proxy in front of a BOSH endpoint (tests/support/reverse_proxy.py)
#   nginx_factory  function: (upstream_url, variant="default"|"bosh") -> private
#                  nginx on 127.0.0.1, stopped at test end
# ===========================================================================


@pytest.fixture
def nginx_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., ReverseProxy]]:
    _need("nginx")
    started: list[ReverseProxy] = []

    def factory(upstream_url: str, variant: str = "default") -> ReverseProxy:
        proxy = start_nginx(
            tmp_path_factory.mktemp(f"nginx-{variant}"), upstream_url, variant=variant
        )
        started.append(proxy)
        return proxy

    try:
        yield factory
    finally:
        for proxy in started:
            proxy.stop()


# ===========================================================================
# Headless Chromium + Strophe.js harness (tests/support/browser.py)
#   static_server, playwright_sync, browser, harness_page
# ===========================================================================
from support.browser_fixtures import *  # noqa: E402,F403
