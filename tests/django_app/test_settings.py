"""How the adapter reads ``BOSH_PREBIND``: keys in any case (``from_mapping`` takes them so, and
``ENABLED``/``CREDENTIALS``, which the adapter reads itself, must agree), mistakes refused as
``ImproperlyConfigured``, and a missing setting said once on the ``bosh_middleware`` logger
rather than leaving every page without a session in silence."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured, MiddlewareNotUsed
from django.http import HttpRequest, HttpResponse
from django.test import Client, RequestFactory

from bosh_middleware.django import BOSHPrebindMiddleware, load_config
from bosh_middleware.django import middleware as django_middleware
from django_app import accounts
from django_app.helpers import PAGE_HEADERS, Account, injected
from support.xmpp_servers import XMPPServer

URL = "http://127.0.0.1:9/http-bind"
LOWER = {"service_url": URL, "credentials": "django_app.accounts.credentials", "timeout": 2}
NOT_A_STR: dict[Any, Any] = {**LOWER, 1: 2}


def test_lower_case_keys() -> None:
    config = load_config(LOWER)
    assert config is not None
    assert config.credentials is accounts.credentials and config.timeout == 2
    mixed = {"Service_Url": URL, "Credentials": "django_app.accounts.credentials"}
    assert load_config(mixed) is not None


@pytest.mark.parametrize("key", ["enabled", "Enabled", "ENABLED"])
def test_enabled_in_any_case(key: str) -> None:
    assert load_config({**LOWER, key: False}) is None
    assert load_config({**LOWER, key: True}) is not None


@pytest.mark.django_db(transaction=True)
def test_page_with_lower_case_keys_gets_a_session(
    alice: Account, bosh: XMPPServer, settings: Any
) -> None:
    """The report: ``"credentials"`` reached ``from_mapping`` as a string, and every page
    failed with "credentials must be a callable"."""
    settings.BOSH_PREBIND = {**LOWER, "service_url": bosh.service_url, "timeout": 10}
    client = Client()
    client.force_login(alice.user)
    found = injected(client.get("/page/", headers=PAGE_HEADERS).content)
    assert found.jid.split("/")[0] == alice.jid


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({**LOWER, "timout": 5}, "unknown BOSH prebind setting: timout (did you mean timeout?)"),
        ({**LOWER, "TIMEOUT": 5}, "BOSH_PREBIND has both timeout and TIMEOUT"),
        ({**LOWER, "CREDENTIALS": "x.y"}, "BOSH_PREBIND has both credentials and CREDENTIALS"),
        ({**LOWER, "enabled": "False"}, "enabled must be True or False, not str 'False'"),
        ({**LOWER, "timeout": "5"}, "timeout must be a number"),
        ({**LOWER, "credentials": 42}, "credentials must be a callable"),
        ({**LOWER, "credentials": "django_app.accounts.nope"}, "credentials 'django_app."),
        ({"service_url": URL}, "BOSH_PREBIND has no CREDENTIALS."),
        ({"credentials": None}, "BOSH_PREBIND has no SERVICE_URL or CREDENTIALS."),
        ([("SERVICE_URL", URL)], "BOSH_PREBIND must be a dict, not list"),
        (NOT_A_STR, "BOSH_PREBIND: keys must be strings, not 1"),
    ],
)
def test_mistakes_are_improperly_configured(values: Any, message: str) -> None:
    with pytest.raises(ImproperlyConfigured) as raised:
        load_config(values)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("values", "messages"),
    [
        (
            {**LOWER, "ENABLED": "False", "EXCLUDE_PATHS": "admin"},
            ["ENABLED must be True or False", "EXCLUDE_PATHS"],
        ),
        (
            {**LOWER, "EXCLUDE_PATH": ("/s/",), "ENABLE": True, "WAIT": "3"},
            ["EXCLUDE_PATH (did you mean", "ENABLE (did you mean", "WAIT must be"],
        ),
        ({"ENABLED": 1, "SERVICE_URL": URL}, ["ENABLED must be True or False", "no CREDENTIALS"]),
    ],
)
def test_every_mistake_is_said_at_once(values: Any, messages: list[str]) -> None:
    """Not one per restart of the project: the system check shows them all."""
    with pytest.raises(ImproperlyConfigured) as raised:
        load_config(values)
    for message in messages:
        assert message in str(raised.value), (message, str(raised.value))


# --- no BOSH_PREBIND at all -----------------------------------------------------------------


@pytest.fixture
def warned_afresh() -> Iterator[None]:
    django_middleware._warn_unset.cache_clear()
    yield
    django_middleware._warn_unset.cache_clear()


def view(request: HttpRequest) -> HttpResponse:
    return HttpResponse()


def unset_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "bosh_middleware" and r.levelno == logging.WARNING
    ]


@pytest.mark.usefixtures("warned_afresh")
def test_missing_setting_is_logged_once(settings: Any, caplog: pytest.LogCaptureFixture) -> None:
    del settings.BOSH_PREBIND
    for _ in range(3):  # (a handler per test Client, a server's WSGI and ASGI handlers)
        with pytest.raises(MiddlewareNotUsed):
            BOSHPrebindMiddleware(view)
    [warning] = unset_warnings(caplog)
    assert warning.startswith("BOSH_PREBIND is not set: ")
    assert "bosh_middleware.django.BOSHPrebindMiddleware" in warning


@pytest.mark.usefixtures("warned_afresh")
def test_disabled_on_purpose_is_quiet(settings: Any, caplog: pytest.LogCaptureFixture) -> None:
    settings.BOSH_PREBIND = {**LOWER, "ENABLED": False}
    with pytest.raises(MiddlewareNotUsed):
        BOSHPrebindMiddleware(view)
    assert unset_warnings(caplog) == []


class _User:
    is_authenticated = True

    def get_username(self) -> str:
        return "alice"


@pytest.mark.parametrize("async_mode", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(
    "headers",
    [
        {"Accept": "application/json", "Sec-Fetch-Dest": "empty"},  # a browser's fetch()
        {"Accept": "application/json"},  # a JSON client
        {},  # says nothing: curl, a script
    ],
    ids=["fetch", "json", "nothing"],
)
def test_request_headers_read_from_meta(
    settings: Any, async_mode: bool, headers: dict[str, str]
) -> None:
    """The middleware reads the four headers it needs from ``request.META``: Django's
    ``request.headers`` (every META key parsed, a cached property) is not built for a
    logged-in request that passes through, and the view sees the request as the client sent
    it."""
    settings.BOSH_PREBIND = LOWER
    request = RequestFactory().get("/api/", headers=headers)
    request.user = _User()
    seen: list[bool] = []

    def view(request: HttpRequest) -> HttpResponse:
        seen.append("headers" in request.__dict__)
        return HttpResponse(b"{}", content_type="application/json")

    async def aview(request: HttpRequest) -> HttpResponse:
        return view(request)

    middleware = BOSHPrebindMiddleware(aview if async_mode else view)
    response = middleware(request)
    if async_mode:
        response = asyncio.run(response)
    assert response.content == b"{}"
    assert seen == [False]
    assert "headers" not in request.__dict__
    assert request.headers.get("Accept") == headers.get("Accept")  # (Django still reads them)
