"""Django for the tests in this directory: ``settings.configure()`` with django_app.settings and
pytest-django for the database (a sqlite file: server threads share it).

Fixtures: ``bosh`` (BOSH_PREBIND pointing at the test Prosody), ``alice`` (a Django user with
an XMPP account), ``nobody`` (one without), ``cores`` (every PrebindCore the middleware made,
drained and closed after the test) and ``acores`` (the same for async tests, in their loop).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import django
import pytest
from django.conf import settings as django_settings

from django_app.settings import SETTINGS

if not django_settings.configured:
    django_settings.configure(**SETTINGS)
    django.setup()

from bosh_middleware.django import middleware
from django_app import accounts
from django_app.helpers import Account, RecordingCore, make_account
from support.xmpp_servers import XMPPServer


@pytest.fixture(scope="module")
def django_browser(browser: Any) -> Iterator[Any]:
    """``browser``, and Django allowed to use its ORM on the main thread meanwhile: the sync
    Playwright API keeps an event loop running there, which makes Django raise
    SynchronousOnlyOperation (pytest-django's documented advice for Playwright)."""
    old = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    yield browser
    if old is None:
        del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]
    else:
        os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = old


@pytest.fixture(autouse=True)
def cores(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[RecordingCore]]:
    made: list[RecordingCore] = []

    class Core(RecordingCore):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(middleware, "PrebindCore", Core)
    yield made
    for core in made:
        core.drain()


@pytest.fixture
async def acores(cores: list[RecordingCore]) -> AsyncIterator[list[RecordingCore]]:
    """For async tests: drain the async side in the test's own event loop."""
    yield cores
    for core in cores:
        await core.adrain()


@pytest.fixture
def bosh(prosody: XMPPServer, settings: Any) -> Iterator[XMPPServer]:
    settings.BOSH_PREBIND = {**SETTINGS["BOSH_PREBIND"], "SERVICE_URL": prosody.service_url}
    accounts.ACCOUNTS.clear()
    yield prosody
    accounts.ACCOUNTS.clear()


@pytest.fixture
def alice(bosh: XMPPServer, transactional_db: None) -> Account:
    return make_account(bosh, f"alice{secrets.token_hex(3)}")


@pytest.fixture
def nobody(bosh: XMPPServer, transactional_db: None) -> Account:
    """A Django user without an XMPP account."""
    return make_account(bosh, f"nobody{secrets.token_hex(3)}", xmpp=False)
