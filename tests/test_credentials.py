"""``SharedSecretCredentials``: one web user's username must never read as another's JID
(README "SharedSecretCredentials"), and ``derive_password`` must agree with it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import logging
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from bosh_middleware import (
    AuthenticationFailed,
    Credentials,
    Prebinder,
    SharedSecretCredentials,
    StaticCredentials,
    derive_password,
)
from bosh_middleware.credentials import (
    escape_localpart,
    is_authenticated,
    page_safe_jid,
    unescape_localpart,
)

SECRET = "s3cret-for-tests"
DOMAIN = "example.org"


class User:
    """A user object as Flask-Login or Starlette hand over: a free-text ``username``."""

    def __init__(self, username: str) -> None:
        self.username = username


creds_for = SharedSecretCredentials(SECRET, DOMAIN)


def _creds(name: str) -> Credentials:
    creds = creds_for(User(name))
    assert creds is not None, name
    return creds


@pytest.mark.parametrize(
    "name",
    [
        "alice@example.org/x",  # the reviewer's repro: bare JID alice@example.org
        "alice@example.org",
        "alice@other.example",
        "alice/x",  # used to raise ValueError inside the credentials callable
        "ALICE@EXAMPLE.ORG/pwn",
        "alice\\40example.org",  # the escape itself, typed as a username
    ],
)
def test_a_username_cannot_name_another_users_account(name: str) -> None:
    alice, evil = _creds("alice"), _creds(name)
    assert evil.domain == DOMAIN
    assert evil.localpart != alice.localpart
    assert evil.user_key != alice.user_key
    assert evil.password != alice.password
    # one localpart, no resource: the whole username stayed inside the localpart
    assert "/" not in evil.jid and evil.jid.count("@") == 1
    assert unescape_localpart(evil.localpart) == name.lower()


@pytest.mark.parametrize(
    ("name", "localpart"),
    [
        ("Alice Smith", "alice\\20smith"),
        ('a"b&c', "a\\22b\\26c"),
        ("o'neil", "o\\27neil"),
        ("a/b:c", "a\\2fb\\3ac"),
        ("<b>", "\\3cb\\3e"),
        ("bob@gmail.com", "bob\\40gmail.com"),
        ("back\\slash", "back\\5cslash"),
        # a backslash is escaped even where XEP-0106 would leave it: else "a\20b" and "a b"
        # would both be a\20b
        ("a\\20b", "a\\5c20b"),
        ("élodie", "élodie"),
    ],
)
def test_localparts_are_lower_cased_and_xep0106_escaped(name: str, localpart: str) -> None:
    creds = _creds(name)
    assert creds.jid == f"{localpart}@{DOMAIN}"
    assert escape_localpart(name) == localpart
    assert unescape_localpart(localpart) == name.lower()


def test_distinct_usernames_get_distinct_accounts() -> None:
    """Every lower-cased username over the characters that matter maps to its own JID."""
    alphabet = "a \\@/20:"
    names = {
        "".join(chars)
        for n in range(1, 5)
        for chars in itertools.product(alphabet, repeat=n)
        if "".join(chars) == "".join(chars).strip()
    }
    jids = {_creds(name).jid for name in names}
    assert len(jids) == len(names)
    passwords = {_creds(name).password for name in names}
    assert len(passwords) == len(names)


def test_usernames_differing_only_in_case_share_an_account() -> None:
    """Documented: XMPP localparts are case-insensitive, so this cannot be otherwise."""
    assert _creds("Alice") == _creds("alice") == _creds("ALICE")


@pytest.mark.parametrize(
    "name",
    ["", " alice", "alice ", "\talice", "ali\nce", "alice\x00", "ali\x7fce", "\ud800"],
    ids=["empty", "lead", "trail", "tab", "newline", "nul", "del", "surrogate"],
)
def test_unusable_usernames_get_no_session_and_a_warning(name: str, caplog: Any) -> None:
    caplog.set_level(logging.WARNING, logger="bosh_middleware")
    creds = SharedSecretCredentials(SECRET, DOMAIN, username=lambda user: name)
    assert creds(object()) is None
    [record] = [r for r in caplog.records if r.name == "bosh_middleware"]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "SharedSecretCredentials" in message
    assert SECRET not in message
    assert "\n" not in message and "\x00" not in message  # no log injection


def test_no_username_is_no_session_without_a_warning(caplog: Any) -> None:
    """``None`` is the ``username=`` callable's way to say "no XMPP account": not a mistake."""
    caplog.set_level(logging.WARNING, logger="bosh_middleware")
    assert SharedSecretCredentials(SECRET, DOMAIN, username=lambda user: None)(object()) is None
    assert caplog.records == []


def test_derive_password_agrees_with_shared_secret_credentials() -> None:
    for name in ("alice", "Alice Smith", "bob@gmail.com", "a\\b"):
        creds = _creds(name)
        assert derive_password(SECRET, creds.jid) == creds.password
        # as an operator may type it: the escapes in upper case, the domain too
        assert derive_password(SECRET, creds.jid.upper()) == creds.password
        assert derive_password(SECRET.encode(), creds.jid) == creds.password


@pytest.mark.parametrize("domain", ["", "example.org/x", "a@example.org", "example .org"])
def test_the_domain_must_be_a_bare_domain(domain: str) -> None:
    with pytest.raises(ValueError, match="bare XMPP domain"):
        SharedSecretCredentials(SECRET, domain)


class _SecretStr:
    """As pydantic's SecretStr: the secret behind a method, a repr that hides it."""

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "SecretStr('**********')"


@pytest.mark.parametrize("secret", [_SecretStr(SECRET), 12345, ["s3cret"]])
def test_the_secret_must_be_a_str_or_bytes(secret: Any) -> None:
    """Refused at set-up: taken as it was, it failed every page's password derivation (a
    TypeError logged on each, no session for anyone) from a helper that looked configured."""
    with pytest.raises(TypeError, match="secret must be a str or bytes") as info:
        SharedSecretCredentials(secret, DOMAIN)
    assert "s3cret" not in str(info.value) and "12345" not in str(info.value)


@pytest.mark.parametrize("localpart", ["a b", "a@b", "a/b", "a\\", "a\\zz", "a\\2", "\\20a"])
def test_unescape_refuses_what_escape_never_produces(localpart: str) -> None:
    with pytest.raises(ValueError):
        unescape_localpart(localpart)


@pytest.mark.parametrize("jid", ["@example.org", "alice@", "alice@/res", "alice"])
def test_credentials_need_a_localpart_and_a_domain(jid: str) -> None:
    with pytest.raises(ValueError, match="not a user JID"):
        Credentials(jid, "pw")


def test_a_crafted_username_cannot_log_in_as_another_user(prosody: Any) -> None:
    """The reviewer's live repro, against Prosody: the web user ``<victim>@localhost/pwn`` used
    to get a session as ``<victim>``; an escaped username gets its own provisioned account."""
    secret = f"secret-{uuid.uuid4().hex}"
    creds = SharedSecretCredentials(secret, prosody.domain)
    victim = f"victim-{uuid.uuid4().hex[:8]}"
    prosody.register(victim, derive_password(secret, f"{victim}@{prosody.domain}"))
    carol = f"Carol Smith {uuid.uuid4().hex[:6]}"
    carol_jid = f"{escape_localpart(carol)}@{prosody.domain}"
    prosody.register(escape_localpart(carol), derive_password(secret, carol_jid))
    with Prebinder(prosody.service_url) as prebinder:
        session = prebinder.prebind(creds(User(victim)))
        assert session.jid.startswith(f"{victim}@{prosody.domain}/")
        prebinder.terminate(session)
        with pytest.raises(AuthenticationFailed):
            prebinder.prebind(creds(User(f"{victim}@{prosody.domain}/pwn")))
        session = prebinder.prebind(creds(User(carol)))
        assert session.jid.split("/", 1)[0] == carol_jid
        prebinder.terminate(session)


class _Named:
    """A user object with only a display name (and, as Starlette's ``BaseUser``, an
    ``identity`` that raises until a subclass defines it)."""

    display_name = "Alice"

    @property
    def identity(self) -> str:
        raise NotImplementedError


def test_a_display_name_is_no_username() -> None:
    """Two users may share a display name: it must not map to an XMPP account."""
    assert SharedSecretCredentials("s3cret", "example.org")(_Named()) is None
    assert StaticCredentials({"Alice": ("alice@example.org", "pw")})(_Named()) is None


def test_a_user_the_default_lookup_finds_no_username_on_is_reported_once_per_type(
    caplog: Any,
) -> None:
    """A Flask-Login ``UserMixin`` with only ``id`` and ``email``: every page goes out without
    a session, and one warning per user class says why, naming the class, never the user."""

    class EmailOnly:
        is_authenticated = True

        def __init__(self, email: str) -> None:
            self.id, self.email = 7, email

    caplog.set_level(logging.WARNING, logger="bosh_middleware")
    shared = SharedSecretCredentials(SECRET, DOMAIN)
    static = StaticCredentials({"alice": ("alice@example.org", "pw")})
    for helper in (shared, static, shared):
        assert helper(EmailOnly("alice@example.org")) is None
    [record] = caplog.records
    message = record.getMessage()
    assert "EmailOnly" in message and "username=" in message
    assert "alice@example.org" not in message
    caplog.clear()
    assert shared(None) is None and caplog.records == []  # no user at all: nothing to say


@pytest.mark.parametrize(
    "jid,safe",
    [
        ("alice@example.org/web-3f9c2a1b7d0e", True),
        ("a=b@example.org/web-1", True),  # "=" is a localpart character
        ("alice\\20smith@example.org/web-1", True),  # XEP-0106 escapes
        ("alice@example.org/phone/1@x", True),  # a resource may hold "/" and "@"
        ("alice@example.org/onerror=alert(1)//", False),  # an attribute value
        ("a:b=c@example.org/r", False),  # a "javascript:" URL would need the ":" first
        ("alice@example.org/a b", False),
        ("alice@exa=mple.org/r", False),
        ('alice@example.org/"', False),
        ("alice@example.org/<b>", False),
        ("alice@example.org", False),  # no resource
        ("example.org/r", False),  # no localpart
    ],
)
def test_page_safe_jid(jid: str, safe: bool) -> None:
    assert page_safe_jid(jid) is safe


@pytest.mark.parametrize(
    ("jid", "password", "resource", "named"),
    [
        ("alice@localhost", b"pw-bytes", None, "password"),  # PLAIN sent "b'pw-bytes'"
        ("alice@localhost", 12345, None, "password"),
        (5, "pw-str", None, "jid"),  # AttributeError, naming neither
        (b"alice@localhost", "pw-str", None, "jid"),
        ("alice@localhost", "pw-str", 5, "resource"),
    ],
)
def test_credentials_of_the_wrong_type_are_refused(
    jid: Any, password: Any, resource: Any, named: str
) -> None:
    with pytest.raises(TypeError, match=f"^Credentials {named} must be a str") as info:
        Credentials(jid, password, resource=resource)
    assert "pw-" not in str(info.value)
    with pytest.raises(TypeError, match=r"^Credentials jid must be a str"):
        Credentials.anonymous(None)  # type: ignore[arg-type]


class _AnonymousUser:
    """Django's ``AnonymousUser``, as far as the lookup sees it."""

    is_authenticated = False
    username = ""

    def get_username(self) -> str:
        return self.username


class _UnauthenticatedUser:
    """Starlette's ``UnauthenticatedUser``: no username, an ``identity`` that raises."""

    is_authenticated = False
    display_name = ""

    @property
    def identity(self) -> str:
        raise NotImplementedError


class _EmptyName:
    """A logged-in user whose username is empty: it has one, and it is none."""

    is_authenticated = True
    username = ""


@pytest.mark.parametrize("user", [_AnonymousUser(), _UnauthenticatedUser(), _EmptyName(), ""])
def test_a_logged_out_or_empty_named_user_gets_no_session_without_a_warning(
    user: Any, caplog: Any
) -> None:
    """README: a user with no username (an empty one, as Django's AnonymousUser has) gets no
    session "without the warning", which is for user classes with no username at all."""
    caplog.set_level(logging.WARNING, logger="bosh_middleware")
    assert SharedSecretCredentials(SECRET, DOMAIN)(user) is None
    assert StaticCredentials({"": ("alice@example.org", "pw")})(user) is None
    assert caplog.records == []


def test_the_readme_says_how_to_compute_the_shared_secret_password() -> None:
    """An XMPP auth module must compute the very same string: the README's recipe is it."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    [recipe] = [block for block in blocks if "urlsafe_b64encode" in block]
    for secret, jid in (
        (SECRET, "alice@example.org"),
        ("sécret", "Alice\\20Smith@Example.ORG"),
        ("s", "ÄLICE@example.org"),
    ):
        namespace: dict[str, Any] = {
            "base64": base64,
            "hmac": hmac,
            "hashlib": hashlib,
            "secret": secret,
            "bare_jid": jid,
        }
        exec(recipe, namespace)
        assert namespace["password"] == derive_password(secret, jid)
        assert len(namespace["password"]) == 43 and "=" not in namespace["password"]


class _Flagged:
    def __init__(self, flag: Any) -> None:
        self.is_authenticated = flag


class _OldStyle:
    """Django < 1.10 and some custom classes: ``is_authenticated()`` is a method."""

    def __init__(self, answer: Any) -> None:
        self._answer = answer

    def is_authenticated(self) -> Any:
        return self._answer


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        (None, False),
        ("", False),  # REMOTE_USER unset or empty
        ("bob", True),  # REMOTE_USER
        (_Flagged(True), True),
        (_Flagged(False), False),
        (_Flagged(1), True),  # a truthy flag that is no bool
        (_Flagged(0), False),
        (_OldStyle(True), True),
        (_OldStyle(False), False),
        (_OldStyle(None), False),
    ],
)
def test_is_authenticated(user: Any, expected: bool) -> None:
    answer = is_authenticated(user)
    assert answer is expected
