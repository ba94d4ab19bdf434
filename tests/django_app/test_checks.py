"""System checks: bosh_prebind.E001 (settings), W002/W003 (MIDDLEWARE order), and what the
middleware does in each order W002 warns of."""

from __future__ import annotations

import logging
from typing import Any

import django
import pytest
from django.core.checks import CheckMessage, run_checks
from django.test import Client, override_settings

from django_app import views
from django_app.helpers import (
    PAGE_HEADERS,
    Account,
    RecordingCore,
    assert_dead,
    assert_live,
    injected,
)
from django_app.settings import MIDDLEWARE, SETTINGS
from support.xmpp_servers import XMPPServer

OURS = "bosh_middleware.django.BOSHPrebindMiddleware"
GOOD = SETTINGS["BOSH_PREBIND"]
SESSION = "django.contrib.sessions.middleware.SessionMiddleware"
AUTH = "django.contrib.auth.middleware.AuthenticationMiddleware"
GZIP = "django.middleware.gzip.GZipMiddleware"
DJANGO_CSP = "csp.middleware.CSPMiddleware"
DJANGO_6_CSP = "django.middleware.csp.ContentSecurityPolicyMiddleware"
REMOTE_USER = "django.contrib.auth.middleware.RemoteUserMiddleware"


def messages(**settings: Any) -> list[CheckMessage]:
    with override_settings(**settings):
        return [m for m in run_checks() if m.id and m.id.startswith("bosh_prebind.")]


def ours(**settings: Any) -> list[str]:
    return [str(m.id) for m in messages(**settings)]


def moved(name: str, after: bool) -> list[str]:
    """MIDDLEWARE with ``name`` listed right after (below) or right before (above) ours."""
    rest = [m for m in MIDDLEWARE if m != name]
    i = rest.index(OURS) + (1 if after else 0)
    return [*rest[:i], name, *rest[i:]]


def test_good_configuration_passes() -> None:
    assert ours() == []
    assert ours(MIDDLEWARE=moved(GZIP, after=False)) == []
    assert ours(BOSH_PREBIND={"ENABLED": False}) == []


def test_keys_in_any_case_pass() -> None:
    """As the middleware takes them (the report: "has no SERVICE_URL" though it was there)."""
    lower = {key.lower(): value for key, value in GOOD.items()}
    assert ours(BOSH_PREBIND=lower) == []
    assert ours(BOSH_PREBIND={"enabled": False}) == []


@pytest.mark.parametrize(
    "value",
    [
        None,
        {"CREDENTIALS": GOOD["CREDENTIALS"]},
        {"SERVICE_URL": "http://x/http-bind"},
        {**GOOD, "CREDENTIALS": "django_app.accounts.missing"},
        {**GOOD, "CREDENTIALS": "no_such_module.credentials"},
        {**GOOD, "MODE": "telepathy"},
        {**GOOD, "NO_SUCH_SETTING": 1},
    ],
)
def test_e001_bad_settings(value: dict[str, Any] | None, settings: Any) -> None:
    if value is None:
        del settings.BOSH_PREBIND
        assert ours() == ["bosh_prebind.E001"]
    else:
        assert ours(BOSH_PREBIND=value) == ["bosh_prebind.E001"]


@pytest.mark.parametrize(
    ("value", "message", "example"),
    [
        ({"CREDENTIALS": GOOD["CREDENTIALS"]}, "BOSH_PREBIND has no SERVICE_URL.", True),
        ({"service_url": "http://x/http-bind"}, "BOSH_PREBIND has no CREDENTIALS.", True),
        ({**GOOD, "TIMEOUT": "5"}, "BOSH_PREBIND: TIMEOUT must be a number", False),
        ({**GOOD, "TIMOUT": 5}, "TIMOUT (did you mean TIMEOUT?)", False),
        ({**GOOD, "MODE": "telepathy"}, "MODE must be 'script', 'headers' or 'both'", False),
        ({**GOOD, "CREDENTIALS": "django_app.accounts.missing"}, "CREDENTIALS 'django_app", False),
    ],
)
def test_e001_hint_fits_the_error(value: dict[str, Any], message: str, example: bool) -> None:
    """The example settings only for a missing key: for a wrong value it would suggest that
    the key was missing, and the message already says what to change."""
    [error] = messages(BOSH_PREBIND=value)
    assert message in error.msg
    if example:
        assert error.hint is not None and error.hint.startswith("e.g. BOSH_PREBIND = {")
    else:
        assert error.hint is None


@pytest.mark.parametrize(
    ("outer", "says"),
    [
        (SESSION, "a page's prebind starts only after the view"),
        (AUTH, "a page's prebind starts only after the view"),
        (REMOTE_USER, "answers everyone 401"),
        (DJANGO_CSP, "go out without a session"),
        (DJANGO_6_CSP, "browsers block the script"),
    ],
)
def test_w002_listed_before_session_auth_or_csp(outer: str, says: str) -> None:
    middleware = moved(outer, after=True)
    if outer == SESSION:  # keep auth after sessions, as Django's own check wants
        middleware = [m for m in middleware if m != AUTH] + [AUTH]
    warnings = [m for m in messages(MIDDLEWARE=middleware) if m.id == "bosh_prebind.W002"]
    assert warnings and all(says in m.msg for m in warnings)
    assert ours(MIDDLEWARE=moved(outer, after=False)) == []


# --- what W002 warns of, shown: each order does what its message says ------------------------


def logged_in(account: Account) -> Client:
    client = Client()
    client.force_login(account.user)
    return client


@pytest.mark.django_db(transaction=True)
def test_listed_before_auth_prebinds_only_after_the_view(
    alice: Account, bosh: XMPPServer, settings: Any, cores: list[RecordingCore]
) -> None:
    """The report: a page still gets a session, as the user is read again after the view (the
    inner AuthenticationMiddleware has set it by then), but it does not overlap the view, and
    the endpoint, answered before any inner middleware runs, never sees a user."""
    settings.MIDDLEWARE = moved(AUTH, after=True)
    client = logged_in(alice)
    views.SLOW_STARTED.clear()
    r = client.get("/slow/", headers=PAGE_HEADERS)
    found = injected(r.content)
    assert_live(bosh.service_url, found.sid, found.rid)
    assert cores[0].started[0] > views.SLOW_STARTED[0]  # (in order, it is the other way round)
    assert client.get("/bosh/prebind").status_code == 401


@pytest.mark.django_db(transaction=True)
def test_listed_before_remote_user_answers_its_users_401(
    alice: Account, bosh: XMPPServer, settings: Any
) -> None:
    """RemoteUserMiddleware sets ``request.user`` too (W002 said nothing of it): below ours,
    the endpoint, answered before it runs, never sees the user the web server names."""
    settings.AUTHENTICATION_BACKENDS = ["django.contrib.auth.backends.RemoteUserBackend"]
    settings.MIDDLEWARE = [*MIDDLEWARE, REMOTE_USER]
    assert Client().get("/bosh/prebind", REMOTE_USER=alice.username).status_code == 401
    settings.MIDDLEWARE = moved(REMOTE_USER, after=False)
    assert Client().get("/bosh/prebind", REMOTE_USER=alice.username).status_code == 200


@pytest.mark.django_db(transaction=True)
def test_listed_before_django_csp_serves_the_page_without_a_session(
    alice: Account,
    bosh: XMPPServer,
    settings: Any,
    cores: list[RecordingCore],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """django-csp refuses a nonce once its header is written (CSPNonceError): that failed the
    page with a 500. Fail open: the page, no session, the session ended, and why in the log."""
    from csp.constants import NONCE, SELF

    settings.MIDDLEWARE = moved(DJANGO_CSP, after=True)
    settings.CONTENT_SECURITY_POLICY = {"DIRECTIVES": {"script-src": [SELF, NONCE]}}
    with caplog.at_level(logging.WARNING, logger="bosh_middleware"):
        r = logged_in(alice).get("/page/", headers=PAGE_HEADERS)
    assert r.status_code == 200 and b"BOSH_" not in r.content
    assert "CSPNonceError" in caplog.text and "below the CSP middleware" in caplog.text
    [pending] = cores[0].pendings
    session = pending._future.result(timeout=10)
    cores[0].drain()  # waits for the termination
    assert_dead(bosh.service_url, session.sid, session.rid)


@pytest.mark.skipif(django.VERSION < (6, 0), reason="Django 6's built-in CSP")
@pytest.mark.django_db(transaction=True)
def test_listed_before_django_6_csp_has_its_script_blocked(
    alice: Account, bosh: XMPPServer, settings: Any
) -> None:
    from django.utils.csp import CSP

    settings.MIDDLEWARE = moved(DJANGO_6_CSP, after=True)
    settings.SECURE_CSP = {"script-src": [CSP.SELF, CSP.NONCE]}
    r = logged_in(alice).get("/page/", headers=PAGE_HEADERS)
    assert injected(r.content).nonce
    assert r["Content-Security-Policy"] == "script-src 'self'"  # no nonce: the script is blocked


def test_w003_gzip_listed_after() -> None:
    assert ours(MIDDLEWARE=moved(GZIP, after=True)) == ["bosh_prebind.W003"]
