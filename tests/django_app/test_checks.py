"""System checks: bosh_prebind.E001 (settings), W002/W003 (MIDDLEWARE order)."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.checks import run_checks
from django.test import override_settings

from django_app.settings import MIDDLEWARE, SETTINGS

OURS = "bosh_middleware.django.BOSHPrebindMiddleware"
GOOD = SETTINGS["BOSH_PREBIND"]
SESSION = "django.contrib.sessions.middleware.SessionMiddleware"
AUTH = "django.contrib.auth.middleware.AuthenticationMiddleware"
GZIP = "django.middleware.gzip.GZipMiddleware"


def ours(**settings: Any) -> list[str]:
    with override_settings(**settings):
        return [m.id for m in run_checks() if m.id and m.id.startswith("bosh_prebind.")]


def moved(name: str, after: bool) -> list[str]:
    """MIDDLEWARE with ``name`` listed right after (below) or right before (above) ours."""
    rest = [m for m in MIDDLEWARE if m != name]
    i = rest.index(OURS) + (1 if after else 0)
    return [*rest[:i], name, *rest[i:]]


def test_good_configuration_passes() -> None:
    assert ours() == []
    assert ours(MIDDLEWARE=moved(GZIP, after=False)) == []
    assert ours(BOSH_PREBIND={"ENABLED": False}) == []


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
    "outer",
    [
        SESSION,
        AUTH,
        "csp.middleware.CSPMiddleware",
        "django.middleware.csp.ContentSecurityPolicyMiddleware",
    ],
)
def test_w002_listed_before_session_auth_or_csp(outer: str) -> None:
    middleware = moved(outer, after=True)
    if outer == SESSION:  # keep auth after sessions, as Django's own check wants
        middleware = [m for m in middleware if m != AUTH] + [AUTH]
    assert "bosh_prebind.W002" in ours(MIDDLEWARE=middleware)
    assert ours(MIDDLEWARE=moved(outer, after=False)) == []


def test_w003_gzip_listed_after() -> None:
    assert ours(MIDDLEWARE=moved(GZIP, after=True)) == ["bosh_prebind.W003"]
