"""Settings: one set of names, spelled per framework (README "Settings"), engine settings routed
to ``PrebindOptions`` whichever adapter is given them."""

from __future__ import annotations

from typing import Any

import pytest

from bosh_middleware import Credentials
from bosh_middleware.asgi import BOSHPrebindMiddleware as ASGIMiddleware
from bosh_middleware.config import MiddlewareConfig
from bosh_middleware.session import PrebindOptions
from bosh_middleware.wsgi import BOSHPrebindMiddleware as WSGIMiddleware

URL = "http://127.0.0.1:5280/http-bind"


def creds(user: Any) -> Credentials:
    return Credentials("alice@localhost", "secret")


def inner_asgi(scope: Any, receive: Any, send: Any) -> Any:
    raise AssertionError("not called")


def inner_wsgi(environ: Any, start_response: Any) -> Any:
    raise AssertionError("not called")


def test_from_mapping_routes_engine_settings_to_options() -> None:
    config = MiddlewareConfig.from_mapping(
        {
            "SERVICE_URL": URL,
            "CREDENTIALS": creds,
            "MODE": "both",
            "EXCLUDE_PATHS": ["/static/"],
            "MECHANISMS": ["SCRAM-SHA-1"],
            "WAIT": 30,
            "TRANSPORT": "httpx",
        }
    )
    assert config.mode == "both"
    assert config.exclude_paths == ("/static/",)
    assert config.options.mechanisms == ("SCRAM-SHA-1",)
    assert config.options.wait == 30
    assert config.options.transport == "httpx"


def test_from_mapping_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown BOSH prebind setting: TIMEOUTS"):
        MiddlewareConfig.from_mapping({"SERVICE_URL": URL, "CREDENTIALS": creds, "TIMEOUTS": 1})


def test_from_mapping_keeps_an_options_object_and_overrides_it() -> None:
    base = PrebindOptions(wait=20, resource_prefix="tab")
    config = MiddlewareConfig.from_mapping(
        {"service_url": URL, "credentials": creds, "options": base, "wait": 10}
    )
    assert config.options.wait == 10
    assert config.options.resource_prefix == "tab"


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: ASGIMiddleware(inner_asgi, URL, creds, **kw),
        lambda **kw: WSGIMiddleware(inner_wsgi, URL, creds, **kw),
    ],
    ids=["asgi", "wsgi"],
)
def test_adapters_take_engine_settings_as_keyword_arguments(make: Any) -> None:
    """README: "ASGI/WSGI/Starlette take them as lower-case keyword arguments", engine settings
    (``MECHANISMS``, ``WAIT``, ``TRANSPORT`` ...) included."""
    mw = make(mechanisms=["PLAIN"], wait=45, transport="builtin", timeout=2.0, mode="headers")
    assert mw.config.mode == "headers"
    assert mw.config.timeout == 2.0
    assert mw.config.options.mechanisms == ("PLAIN",)
    assert mw.config.options.wait == 45
    assert mw.config.options.transport == "builtin"
    # the engine's per-request timeout is capped at the page's patience
    assert mw.config.options.timeout <= 2.0
    with pytest.raises(ValueError, match="unknown BOSH prebind setting"):
        make(no_such_setting=1)


def test_a_misspelt_transport_fails_at_configuration_time() -> None:
    with pytest.raises(ValueError, match="transport"):
        ASGIMiddleware(inner_asgi, URL, creds, transport="httpz")
