"""Settings: one set of names, spelled per framework (README "Settings"), engine settings routed
to ``PrebindOptions`` whichever adapter is given them."""

from __future__ import annotations

import dataclasses
import math
import re
import ssl
from pathlib import Path
from typing import Any

import pytest

from bosh_middleware import Credentials, Prebinder
from bosh_middleware.asgi import BOSHPrebindMiddleware as ASGIMiddleware
from bosh_middleware.config import MiddlewareConfig
from bosh_middleware.session import PrebindOptions, PrebindSession
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


def test_from_mapping_says_every_mistake_at_once() -> None:
    values = {"service_url": "http://127.0.0.1:5280/http-bind", "credentials": print}
    with pytest.raises(TypeError) as raised:  # (all of one kind: that kind)
        MiddlewareConfig.from_mapping({**values, "timeout": "3", "wait": "60"})
    assert "timeout must be" in str(raised.value) and "wait must be" in str(raised.value)
    with pytest.raises(ValueError) as mixed:
        MiddlewareConfig.from_mapping({**values, "timeout": "3", "tiemout": 3})
    assert "timeout must be" in str(mixed.value) and "did you mean timeout" in str(mixed.value)


def test_from_mapping_rejects_unknown_keys() -> None:
    with pytest.raises(
        ValueError, match=r"^unknown BOSH prebind setting: TIMEOUTS \(did you mean TIMEOUT\?\)$"
    ):
        MiddlewareConfig.from_mapping({"SERVICE_URL": URL, "CREDENTIALS": creds, "TIMEOUTS": 1})
    with pytest.raises(ValueError, match=r"service_ur \(did you mean service_url\?\)$"):
        MiddlewareConfig.from_mapping({"service_ur": URL, "credentials": creds})
    with pytest.raises(ValueError, match=r"^unknown BOSH prebind setting: COLOUR$"):
        MiddlewareConfig.from_mapping({"SERVICE_URL": URL, "CREDENTIALS": creds, "COLOUR": 1})


def test_from_mapping_names_a_setting_with_its_prefix() -> None:
    values = {"BOSH_SERVICE_URL": URL, "BOSH_CREDENTIALS": creds}
    config = MiddlewareConfig.from_mapping({**values, "BOSH_WAIT": 20}, prefix="BOSH_")
    assert config.options.wait == 20
    with pytest.raises(TypeError, match=r"^BOSH_WAIT must be"):
        MiddlewareConfig.from_mapping({**values, "BOSH_WAIT": "20"}, prefix="BOSH_")
    with pytest.raises(ValueError, match=r"BOSH_WIAT \(did you mean BOSH_WAIT\?\)$"):
        MiddlewareConfig.from_mapping({**values, "BOSH_WIAT": 20}, prefix="BOSH_")


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


# --- Types (settings from os.environ arrive as strings) -------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ALLOW_INSECURE_PLAIN", "False"),  # truthy: PLAIN over http to a remote host
        ("ALLOW_INSECURE_PLAIN", 0),
        ("PIPELINE", "true"),
        ("BREAKER_THRESHOLD", "5"),  # record_failure raised TypeError, the breaker never opened
        ("BREAKER_THRESHOLD", True),
        ("BREAKER_RESET", "30"),
        ("TIMEOUT", "3"),
        ("TIMEOUT", 0),
        ("WAIT", "59"),
        ("WAIT", 59.0),
        ("HOLD", None),
        ("MAX_RESPONSE_SIZE", "262144"),
        ("MAX_IN_FLIGHT", 0),
        ("MAX_POLLS", 4.5),
        ("MECHANISMS", 5),
        ("MECHANISMS", ["PLAIN", 1]),
        ("MECHANISMS", b"PLAIN"),
        ("HEADERS", "X-Proxy-Secret: s"),
        ("HEADERS", {"X-Proxy-Secret": 1}),
        ("VARIABLES", "BOSH_JID"),  # needs exactly three names: a bare string is a mistake
        ("VARIABLES", ["A", "B"]),
        ("HEADER_NAMES", "X-BOSH-JID,X-BOSH-SID,X-BOSH-RID"),
        ("EXCLUDE_PATHS", 5),
        ("LANG", 1),
        ("ROUTE", 5),
        ("RESOURCE_PREFIX", None),
        ("SERVICE_VARIABLE", None),
        ("ENDPOINT_PATH", 1),
        ("PUBLIC_SERVICE_URL", 1),
        ("VERIFY", "False"),  # would be read as a CA bundle path named "False"
        ("VERIFY", "0"),
        ("VERIFY", 0),
        ("OPTIONS", {"wait": 30}),
        ("MODE", "Script"),
        ("TRANSPORT", None),
    ],
)
def test_from_mapping_refuses_a_wrong_type_naming_the_setting(key: str, value: Any) -> None:
    with pytest.raises((TypeError, ValueError), match=f"^{key} must"):
        MiddlewareConfig.from_mapping({"SERVICE_URL": URL, "CREDENTIALS": creds, key: value})


def test_the_url_is_not_shown_when_refused() -> None:
    with pytest.raises(TypeError, match="SERVICE_URL must be") as info:
        MiddlewareConfig.from_mapping({"SERVICE_URL": b"http://u:pw@host/", "CREDENTIALS": creds})
    assert "pw" not in str(info.value)


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: ASGIMiddleware(inner_asgi, URL, creds, **kw),
        lambda **kw: WSGIMiddleware(inner_wsgi, URL, creds, **kw),
        lambda **kw: MiddlewareConfig(URL, creds, options=PrebindOptions(**kw)),
        lambda **kw: dataclasses.replace(PrebindOptions(), **kw),
    ],
    ids=["asgi", "wsgi", "options", "replace"],
)
@pytest.mark.parametrize(
    ("name", "value"), [("allow_insecure_plain", "False"), ("timeout", "3"), ("max_polls", True)]
)
def test_every_way_of_configuring_checks_types(make: Any, name: str, value: Any) -> None:
    with pytest.raises(TypeError, match=f"{name} must be"):
        make(**{name: value})


def test_breaker_settings_are_checked_in_the_config_itself() -> None:
    with pytest.raises(TypeError, match="breaker_threshold must be an int"):
        MiddlewareConfig(URL, creds, breaker_threshold="5")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="breaker_reset must be a number"):
        MiddlewareConfig(URL, creds, breaker_reset="30")  # type: ignore[arg-type]


def test_a_single_string_is_one_item_where_a_list_of_strings_is_expected() -> None:
    config = MiddlewareConfig.from_mapping(
        {
            "SERVICE_URL": URL,
            "CREDENTIALS": creds,
            "MECHANISMS": "SCRAM-SHA-256",  # one mechanism, not 13
            "EXCLUDE_PATHS": "/static",
        }
    )
    assert config.options.mechanisms == ("SCRAM-SHA-256",)
    assert config.exclude_paths == ("/static",)
    assert PrebindOptions(mechanisms="PLAIN").mechanisms == ("PLAIN",)
    assert PrebindOptions(mechanisms=["PLAIN"]).mechanisms == ("PLAIN",)


def test_values_of_the_right_type_are_kept() -> None:
    context = ssl.create_default_context()
    config = MiddlewareConfig.from_mapping(
        {
            "SERVICE_URL": URL,
            "CREDENTIALS": creds,
            "TIMEOUT": 2,  # an int where a float is expected is fine
            "BREAKER_THRESHOLD": 0,  # (turns the breaker off)
            "BREAKER_RESET": 0.5,
            "ALLOW_INSECURE_PLAIN": True,
            "VARIABLES": ["JID", "SID", "RID"],
            "HEADER_NAMES": ("X-J", "X-S", "X-R"),
            "ENDPOINT_PATH": None,
            "VERIFY": context,
            "HEADERS": {"X-Proxy-Secret": "s"},
            "ROUTE": "xmpp:example.org:5222",
        }
    )
    assert (config.timeout, config.breaker_threshold, config.breaker_reset) == (2, 0, 0.5)
    assert config.options.allow_insecure_plain is True
    assert config.variables == ("JID", "SID", "RID")
    assert config.header_names == ("X-J", "X-S", "X-R")
    assert config.verify is context
    assert config.options.headers == {"X-Proxy-Secret": "s"}
    for verify in (False, "/etc/ssl/certs/ca-certificates.crt"):
        assert MiddlewareConfig(URL, creds, verify=verify).verify == verify


@pytest.mark.parametrize(
    "verify,message",
    [
        ("/nonexistent/ca.pem", "no CA bundle at '/nonexistent/ca.pem'"),
        (__file__, "no CA bundle at"),  # a file, but no certificates in it
    ],
)
def test_a_ca_bundle_that_cannot_be_read_is_refused_at_setup(verify: str, message: str) -> None:
    """Not at the first page: every page's prebind would fail (and a build error at request
    time carried the settings, secret headers included, in its traceback)."""
    with pytest.raises(ValueError, match=message):
        MiddlewareConfig("https://xmpp.example.org/http-bind", creds, verify=verify)


@pytest.mark.parametrize(
    "headers,named",
    [
        ({"X-Secret": "a\r\nX-Injected: 1"}, "'X-Secret'"),
        ({"X-Secret": "nul\x00"}, "'X-Secret'"),
        ({"X-Secret": "euro-\u20ac-topsecret"}, "'X-Secret'"),
        ({"Bad Name": "v"}, "'Bad Name'"),
    ],
)
def test_a_header_that_cannot_go_on_the_wire_is_refused_at_setup(
    headers: dict[str, str], named: str
) -> None:
    for make in (
        lambda: PrebindOptions(headers=headers),
        lambda: MiddlewareConfig.from_mapping(
            {"headers": headers}, service_url=URL, credentials=creds
        ),
    ):
        with pytest.raises(ValueError, match=named) as info:
            make()
        assert "topsecret" not in str(info.value) and "Injected" not in str(info.value)


# --- Secrets in reprs ---------------------------------------------------------------------


def test_header_values_are_redacted_in_reprs_but_still_sent() -> None:
    options = PrebindOptions(headers={"X-Proxy-Secret": "topsecret"})
    config = MiddlewareConfig(URL, creds, options=options)
    for shown in (repr(options), repr(config), str(options)):
        assert "topsecret" not in shown
        assert "X-Proxy-Secret" in shown
    assert options.headers == {"X-Proxy-Secret": "topsecret"}
    assert config.options.headers["X-Proxy-Secret"] == "topsecret"


def test_the_session_repr_redacts_the_service_url_password() -> None:
    url = "https://web:topsecret@xmpp.example.org/http-bind"
    session = PrebindSession(jid="alice@example.org/web-1", sid="s1", rid=10, service_url=url)
    assert "topsecret" not in repr(session)
    assert "xmpp.example.org/http-bind" in repr(session) and "rid=10" in repr(session)
    assert session.service_url == url


def test_every_setting_is_in_the_readme_table_and_every_row_is_a_setting() -> None:
    """The Settings table is where users look: a setting missing there is one nobody finds
    (PIPELINE, MAX_POLLS and HEADERS were), and a row naming none is a promise broken."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    documented = {
        name.lower() for row in rows for name in re.findall(r"`([A-Z_]+)`", row.split("|")[1])
    }
    assert documented == MiddlewareConfig.setting_names() | {"enabled"}


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://example.org/http-bind", "not an http"),
        ("/http-bind", "not an http"),
        ("http://a..b/http-bind", "not a valid host name"),
        ("http://example.org:99999/http-bind", "out of range"),
        ("http://user:pw@a..b/http-bind", "not a valid host name"),
    ],
)
def test_a_service_url_that_can_never_work_is_refused_when_the_settings_are_made(
    url: str, why: str
) -> None:
    """Not at the first page, where the lookup of "a..b" raised UnicodeError (no BOSHError)."""
    with pytest.raises(ValueError, match=why) as info:
        MiddlewareConfig.from_mapping({"SERVICE_URL": url, "CREDENTIALS": creds})
    assert str(info.value).startswith("SERVICE_URL: ") and "pw" not in str(info.value)
    with pytest.raises(ValueError, match=why):
        Prebinder(url)


# --- Values of the right type that can never work -----------------------------------------


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 10**400])
@pytest.mark.parametrize("key", ["TIMEOUT", "BREAKER_RESET"])
def test_a_number_that_is_not_finite_is_refused(key: str, value: float) -> None:
    """inf passed the sign checks, then every prebind failed with OverflowError (a socket
    timeout or deadline made of it; a breaker's Retry-After rounds it)."""
    with pytest.raises(ValueError, match=f"^{key} must be a finite"):
        MiddlewareConfig.from_mapping({"SERVICE_URL": URL, "CREDENTIALS": creds, key: value})


@pytest.mark.parametrize("value", [math.inf, math.nan, 86400.5, 1e7, 10**400])
def test_an_engine_timeout_that_no_socket_takes_is_refused(value: float) -> None:
    """Over about 25 days the sockets' waits overflow too (1e7 s failed every prebind on the
    builtin transport); a day is the most taken."""
    for make in (
        lambda: PrebindOptions(timeout=value),
        lambda: Prebinder(URL, timeout=value),
        lambda: MiddlewareConfig.from_mapping(
            {"SERVICE_URL": URL, "CREDENTIALS": creds, "TIMEOUT": value}
        ),
        lambda: WSGIMiddleware(inner_wsgi, URL, creds, timeout=value),
    ):
        with pytest.raises(ValueError, match=r"(?i)^timeout must be"):
            make()


def test_a_day_is_the_longest_timeout() -> None:
    assert PrebindOptions(timeout=86400).timeout == 86400
    config = MiddlewareConfig(URL, creds, timeout=86400.0, breaker_reset=1e9)
    assert (config.timeout, config.breaker_reset) == (86400.0, 1e9)


@pytest.mark.parametrize(
    "url",
    [
        "http://web:topsecret@xmpp.example.org/http-bind",
        "https://topsecret@xmpp.example.org/http-bind",  # a user name alone may be a token
        "//web:topsecret@xmpp.example.org/http-bind",
        "http://web:topsecret@127.0.0.1:5280/http-bind",
    ],
)
def test_a_public_service_url_with_a_password_is_refused(url: str) -> None:
    """It is written into every page: the examples defaulted it to SERVICE_URL, which the
    README allows a user:password@ in."""
    with pytest.raises(ValueError, match=r"^PUBLIC_SERVICE_URL must not hold a user") as info:
        MiddlewareConfig.from_mapping(
            {"SERVICE_URL": URL, "CREDENTIALS": creds, "PUBLIC_SERVICE_URL": url}
        )
    assert "topsecret" not in str(info.value)
    with pytest.raises(ValueError, match=r"^public_service_url must not hold"):
        WSGIMiddleware(inner_wsgi, URL, creds, public_service_url=url)


@pytest.mark.parametrize(
    "url",
    [
        "javascript:alert(1)",
        "ftp://xmpp.example.org/http-bind",
        "http-bind",  # relative to each page's own path: a different URL on every page
        "/\\evil.example/http-bind",  # a browser reads it as //evil.example/http-bind
        "http://a..b/http-bind",
        "http://web:top/secret@xmpp.example.org/http-bind",  # the "/" cuts the authority short
    ],
)
def test_a_public_service_url_that_is_no_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match=r"^PUBLIC_SERVICE_URL must be an http") as info:
        MiddlewareConfig.from_mapping(
            {"SERVICE_URL": URL, "CREDENTIALS": creds, "PUBLIC_SERVICE_URL": url}
        )
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        None,
        "",
        "/http-bind",
        "https://chat.example/http-bind",
        "//chat.example/http-bind",
        "http://127.0.0.1:5280/http-bind?to=a@b",
        "/bosh@proxy/http-bind",  # a path, not a user name
    ],
)
def test_public_service_urls_browsers_can_use_are_kept(url: str | None) -> None:
    assert MiddlewareConfig(URL, creds, public_service_url=url).public_service_url == url


@pytest.mark.parametrize(
    "names",
    [
        ("X-BOSH-JID\r\nSet-Cookie: evil=1", "X-BOSH-SID", "X-BOSH-RID"),
        ("X-BOSH-JID", "X BOSH SID", "X-BOSH-RID"),
        ("X-BOSH-JID", "X-BOSH-SID", ""),
        ("X-BOSH-JID:", "X-BOSH-SID", "X-BOSH-RID"),
        ("X-BOSH-JÍD", "X-BOSH-SID", "X-BOSH-RID"),
    ],
)
def test_header_names_that_are_no_http_field_names_are_refused(names: tuple[str, ...]) -> None:
    """They go on the wire as they are: a line break in one added a header to every page."""
    with pytest.raises(ValueError, match=r"^HEADER_NAMES must be HTTP header names"):
        MiddlewareConfig.from_mapping(
            {"SERVICE_URL": URL, "CREDENTIALS": creds, "MODE": "headers", "HEADER_NAMES": names}
        )
    with pytest.raises(ValueError, match=r"^header_names must be HTTP header names"):
        ASGIMiddleware(inner_asgi, URL, creds, header_names=names)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ENDPOINT_PATH", "bosh/prebind"),  # matched no request: the endpoint was silently off
        ("ENDPOINT_PATH", ""),
        ("EXCLUDE_PATHS", [""]),  # a prefix of every path: every page went without a session
        ("EXCLUDE_PATHS", ["static"]),  # matched nothing
        ("EXCLUDE_PATHS", "static/"),
        ("EXCLUDE_PATHS", ["/static/", " /admin"]),
        ("EXCLUDE_PATHS", "/static/,/admin"),  # a list from the environment: one odd prefix
    ],
)
def test_paths_must_start_with_a_slash(key: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"^{key} must"):
        MiddlewareConfig.from_mapping({"SERVICE_URL": URL, "CREDENTIALS": creds, key: value})
    with pytest.raises(ValueError, match=f"^{key.lower()} must"):
        WSGIMiddleware(inner_wsgi, URL, creds, **{key.lower(): value})


def test_paths_that_start_with_a_slash_are_kept() -> None:
    config = MiddlewareConfig(URL, creds, endpoint_path="/xmpp/prebind", exclude_paths="/static")
    assert (config.endpoint_path, config.exclude_paths) == ("/xmpp/prebind", ("/static",))
    config = MiddlewareConfig(URL, creds, endpoint_path=None, exclude_paths=["/", "/admin"])
    assert (config.endpoint_path, config.exclude_paths) == (None, ("/", "/admin"))
