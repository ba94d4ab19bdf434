"""``python -m bosh_middleware`` run as a real subprocess against a real Prosody."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from bosh_middleware import PrebindSession, SharedSecretCredentials
from bosh_middleware import cli as cli_module
from test_prebind_servers import assert_attachable

CLI_TIMEOUT = 30


def cli(*args: str, password: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BOSH_")}
    if password is not None:
        environ["BOSH_PASSWORD"] = password
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-m", "bosh_middleware", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env=environ,
    )


def _session(out: str, service_url: str) -> PrebindSession:
    data = json.loads(out)
    assert set(data) == {"jid", "sid", "rid"}, data
    assert isinstance(data["rid"], int) and isinstance(data["sid"], str)
    return PrebindSession(
        jid=data["jid"], sid=data["sid"], rid=data["rid"], service_url=service_url
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_prebind_prints_an_attachable_session(prosody) -> None:
    jid, password = prosody.new_user()
    t0 = time.monotonic()
    res = cli("prebind", prosody.service_url, "--jid", jid, "--timeout", "20", password=password)
    elapsed = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    # the process ends right after printing (a request left open would keep it alive until
    # its read timeout, 20 s: see test_bind_overtaking_the_restart_leaves_the_session_attachable);
    # well below that, as a start of Python on a busy host may take seconds
    assert elapsed < 12, f"bosh-middleware prebind took {elapsed:.1f}s"
    assert res.stderr == ""
    lines = res.stdout.splitlines()
    assert len(lines) == 1, res.stdout  # one JSON object, nothing else
    session = _session(lines[0], prosody.service_url)
    assert session.jid.startswith(jid + "/web-")
    assert password not in res.stdout
    assert_attachable(session)


def test_prebind_with_resource_and_mechanism(prosody_secure) -> None:
    jid, password = prosody_secure.new_user()
    res = cli(
        "prebind",
        prosody_secure.service_url,
        "--jid",
        jid,
        "--resource",
        "cli-tab",
        "--mechanism",
        "PLAIN",
        password=password,
    )
    assert res.returncode == 0, res.stderr
    session = _session(res.stdout, prosody_secure.service_url)
    assert session.jid == f"{jid}/cli-tab"
    assert_attachable(session)


def test_prebind_binds_the_resource_of_a_full_jid(prosody) -> None:
    """``--jid alice@host/desk`` binds what was typed, as ``--resource desk`` does; it was
    dropped without a word, and a fresh random resource bound."""
    jid, password = prosody.new_user()
    res = cli("prebind", prosody.service_url, "--jid", f"{jid}/desk", password=password)
    assert res.returncode == 0, res.stderr
    session = _session(res.stdout, prosody.service_url)
    assert session.jid == f"{jid}/desk"
    assert_attachable(session)


def test_prebind_refuses_two_different_resources() -> None:
    argv = ["--jid", "alice@localhost/desk", "--resource", "tab"]
    stderr = _one_line_usage_error(
        cli("prebind", "http://127.0.0.1:1/http-bind", *argv, password="pw-12345")
    )
    assert "desk" in stderr and "tab" in stderr and "pw-12345" not in stderr


def test_wrong_password(prosody) -> None:
    jid, _ = prosody.new_user()
    wrong = "Wrong-Pa55word-xyz"
    res = cli("prebind", prosody.service_url, "--jid", jid, password=wrong)
    assert res.returncode == 3  # EXIT_AUTH
    assert res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "not-authorized" in res.stderr
    assert "Traceback" not in res.stderr
    assert wrong not in res.stdout + res.stderr


def test_no_mechanism_to_log_in_with_is_a_failure_not_a_refused_login(prosody) -> None:
    """Exit 3 says "the server refused this login"; here none was tried (README)."""
    jid, password = prosody.new_user()
    for argv, says in (
        # PLAIN is not offered over plain http
        (["--jid", jid, "--mechanism", "PLAIN"], "(--mechanism allows PLAIN)"),
        (["--anonymous", "--domain", prosody.domain], "does not offer ANONYMOUS"),
    ):
        res = cli("prebind", prosody.service_url, *argv, password=password)
        assert res.returncode == 1, res.stderr  # EXIT_FAILED
        assert res.stdout == "" and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert res.stderr.startswith("error: cannot log in: ") and says in res.stderr
        assert password not in res.stderr
    # check --jid, for an account on a host that takes only ANONYMOUS
    res = cli("check", prosody.service_url, "--jid", f"x@{prosody.anon_domain}", password="pw")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "invalid-mechanism" in res.stdout


def test_password_only_from_the_environment(prosody) -> None:
    jid, password = prosody.new_user()
    res = cli("prebind", prosody.service_url, "--jid", jid)
    assert res.returncode == 2 and res.stdout == ""
    assert "BOSH_PASSWORD" in res.stderr
    # and it is not an option that would end up in `ps` output
    res = cli("prebind", prosody.service_url, "--jid", jid, "--password", password)
    assert res.returncode == 2 and res.stdout == ""


def test_anonymous(prosody) -> None:
    res = cli("prebind", prosody.service_url, "--anonymous", "--domain", prosody.anon_domain)
    assert res.returncode == 0, res.stderr
    session = _session(res.stdout, prosody.service_url)
    assert session.jid.split("/")[0].endswith("@" + prosody.anon_domain)
    assert_attachable(session)
    res = cli("prebind", prosody.service_url, "--anonymous")
    assert res.returncode == 2 and res.stdout == "" and "--domain" in res.stderr


def test_anonymous_with_a_resource_binds_it(prosody) -> None:
    """``--resource`` with ``--anonymous`` was ignored without a word: a random one bound."""
    argv = ["--anonymous", "--domain", prosody.anon_domain, "--resource", "desk"]
    res = cli("prebind", prosody.service_url, *argv)
    assert res.returncode == 0, res.stderr
    session = _session(res.stdout, prosody.service_url)
    assert session.jid.endswith(f"@{prosody.anon_domain}/desk")
    assert_attachable(session)


def test_check_json(prosody) -> None:
    res = cli("check", prosody.service_url, "--domain", prosody.domain, "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["reachable"] is True
    assert report["domain"] == prosody.domain
    assert "SCRAM-SHA-1" in report["mechanisms"] and "PLAIN" not in report["mechanisms"]
    assert (report["wait"], report["requests"], report["inactivity"]) == (59, 2, 60)
    assert report["secure"] is True  # (loopback: Prosody counts it as secure)
    cors = report["cors"]
    # check sends Origin: https://app.example, and says so; Prosody echoes it
    assert cors["preflight_origin"] == "https://app.example"
    assert cors["access-control-allow-origin"] in ("*", "https://app.example")
    assert "POST" in (cors["access-control-allow-methods"] or "")
    assert "content-type" in (cors["access-control-allow-headers"] or "").lower()
    assert not any("CORS" in w for w in report["warnings"])
    assert "hint" not in report


def test_check_with_a_login_reports_quickstart_and_pipelining(prosody) -> None:
    """With --jid, check logs in three times with one engine: the first learns, the next take
    quickstart and the pipelined SCRAM finish against Prosody (2 round trips). The JID's
    domain is the one asked for, and the password is never printed."""
    jid, password = prosody.new_user()
    res = cli("check", prosody.service_url, "--jid", jid, "--json", password=password)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["reachable"] is True and report["domain"] == prosody.domain
    login = report["login"]
    assert login["jid"] == jid and login["mechanism"] == "SCRAM-SHA-1"
    # The first learns: 4 round trips, more on a busy host (features a poll late, or its
    # restart overtaken by its bind on the second connection, which redoes it one request at
    # a time). The next two are quickstart's, on one connection: nothing there to race.
    first, *warm = login["round_trips"]
    assert first >= 4 and warm == [2, 2], login
    assert login["quickstart"] is True and login["pipelining"] is True
    assert login["transport"] == "builtin"
    # hashed storage: the salt stays, so only the first login derives its keys
    assert login["key_derivations"] == [1, 0, 0] and login["pbkdf2"] == "cryptography"
    assert not any("round trips" in w for w in report["warnings"]), report["warnings"]
    assert not any("salts" in w for w in report["warnings"]), report["warnings"]
    assert password not in res.stdout + res.stderr


def test_check_with_a_login_warns_of_a_server_that_salts_every_login(prosody_secure) -> None:
    """Prosody's plain password store salts every SCRAM attempt afresh: each of the three
    logins runs PBKDF2 in the web process, which check says, with what to do about it."""
    jid, password = prosody_secure.new_user()
    res = cli("check", prosody_secure.service_url, "--jid", jid, "--json", password=password)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    login = report["login"]
    assert login["mechanism"].startswith("SCRAM-"), login
    # The first login derives twice when its restart was overtaken by its bind and it was
    # redone (see the test above: this store salts the redo afresh too); the next two run on
    # one connection, with nothing to race.
    first, *warm = login["key_derivations"]
    assert first in (1, 2) and warm == [1, 1], login
    assert first == 1 or login["round_trips"][0] > 4, login
    (warning,) = [w for w in report["warnings"] if "salts every SCRAM login" in w]
    assert "internal_plain" in warning and "speedups" not in warning  # (cryptography is here)
    assert "speedups" in cli_module._resalting_warning("hashlib")


def test_check_with_a_wrong_password_is_an_auth_failure(prosody) -> None:
    jid, password = prosody.new_user()
    res = cli("check", prosody.service_url, "--jid", jid, "--json", password="wrong-" + password)
    assert res.returncode == 3, res.stderr
    report = json.loads(res.stdout)
    assert report["reachable"] is True
    assert "not-authorized" in report["login"]["error"]
    assert "round_trips" not in report["login"]
    assert "wrong-" + password not in res.stdout + res.stderr


def test_check_login_needs_the_password_in_the_environment(prosody) -> None:
    res = cli("check", prosody.service_url, "--jid", "someone@localhost")
    assert res.returncode == 2 and res.stdout == "" and "BOSH_PASSWORD" in res.stderr


@pytest.mark.ejabberd
def test_check_with_a_login_on_ejabberd_warns_that_quickstart_does_not_hold(ejabberd) -> None:
    jid, password = ejabberd.new_user()
    res = cli("check", ejabberd.service_url, "--jid", jid, "--json", password=password)
    assert res.returncode == 0, res.stderr
    login = json.loads(res.stdout)["login"]
    assert login["quickstart"] is False and login["round_trips"][-1] >= 4, login
    assert any("quickstart" in w for w in json.loads(res.stdout)["warnings"])


def test_check_human_output_and_anonymous_host(prosody) -> None:
    res = cli("check", prosody.service_url, "--domain", prosody.anon_domain)
    assert res.returncode == 0, res.stderr
    assert "ANONYMOUS" in res.stdout and "reachable: True" in res.stdout


def test_check_closed_port(prosody) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/http-bind"
    t0 = time.monotonic()
    res = cli("check", url, "--json", "--timeout", "2")
    assert time.monotonic() - t0 < 10
    assert res.returncode != 0
    report = json.loads(res.stdout)
    assert report["reachable"] is False
    assert "connection-failed" in report["error"]
    assert "hint" not in report  # nothing says the domain is wrong


def test_prebind_closed_port() -> None:
    url = f"http://127.0.0.1:{_closed_port()}/http-bind"
    res = cli("prebind", url, "--jid", "a@localhost", "--timeout", "2", password="pw-12345")
    assert res.returncode == 1
    assert res.stdout == "" and len(res.stderr.strip().splitlines()) == 1
    assert "ServiceUnavailable" in res.stderr and "pw-12345" not in res.stderr


@pytest.mark.parametrize("argv", [["prebind"], ["nonsense"], []])
def test_usage_errors(argv: list[str]) -> None:
    res = cli(*argv)
    assert res.returncode == 2 and res.stdout == ""


def _one_line_usage_error(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 2, res.stderr  # EXIT_USAGE
    assert res.stdout == ""
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    return res.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["prebind", "http://127.0.0.1:1/http-bind", "--jid", "alice"],
        ["prebind", "http://127.0.0.1:1/http-bind", "--jid", "@localhost"],
        ["prebind", "http://127.0.0.1:1/http-bind", "--anonymous", "--domain", "a@b"],
    ],
)
def test_an_invalid_jid_or_domain_is_a_usage_error(argv: list[str]) -> None:
    stderr = _one_line_usage_error(cli(*argv, password="pw-12345"))
    assert "pw-12345" not in stderr
    assert argv[-1] in stderr


@pytest.mark.parametrize(
    "jid",
    [
        "alice",  # no domain: SharedSecretCredentials never builds it
        "alice@",
        "@example.org",
        "alice smith@example.org",  # unescaped: the account is alice\20smith@example.org
        "alice@example.org/pwn@example.org",  # a resource: not the account's JID
        "a\\zz@example.org",
        "\\20alice@example.org",  # " alice" gets no session
    ],
)
def test_derive_password_refuses_a_jid_shared_secret_credentials_never_builds(jid: str) -> None:
    _one_line_usage_error(cli("derive-password", "--jid", jid, BOSH_SHARED_SECRET="s3cret"))


def test_derive_password_names_the_escaped_jid() -> None:
    stderr = _one_line_usage_error(
        cli("derive-password", "--jid", "Alice Smith@example.org", BOSH_SHARED_SECRET="s3cret")
    )
    assert "alice\\20smith@example.org" in stderr


@pytest.mark.parametrize("username", ["alice", "Alice Smith", "bob@gmail.com", "o'neil/x"])
def test_derive_password_is_the_password_shared_secret_credentials_uses(username: str) -> None:
    creds = SharedSecretCredentials("s3cret", "example.org", username=lambda user: username)(None)
    assert creds is not None
    res = cli("derive-password", "--jid", creds.jid, BOSH_SHARED_SECRET="s3cret")
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"{creds.password}\n"


# A service URL no transport can use is a usage error (one line, exit 2), for every command that
# takes one, and shown without the password of its userinfo. Without the check: a traceback.
BAD_URLS = [
    "notaurl",
    "ftp://127.0.0.1/http-bind",
    "http:///http-bind",
    "http://127.0.0.1:abc/http-bind",
    "http://[::1/http-bind",
    "http://127.0.0.1:99999/http-bind",
    "http://user:pw-in-url@a..b/http-bind",  # an empty DNS label: the resolver's UnicodeError
]


@pytest.mark.parametrize("url", BAD_URLS)
def test_prebind_refuses_a_service_url_that_is_not_http(url: str) -> None:
    stderr = _one_line_usage_error(cli("prebind", url, "--jid", "a@localhost", password="x"))
    assert "service URL" in stderr
    assert "pw-in-url" not in stderr


def test_prebind_names_a_wrong_url_before_a_missing_password() -> None:
    """The URL is the mistake to hear of first: setting the password only led to it."""
    for argv in (["--jid", "a@localhost"], ["--anonymous"]):
        stderr = _one_line_usage_error(cli("prebind", "ftp://x/http-bind", *argv))
        assert "service URL" in stderr, argv


@pytest.mark.parametrize("url", BAD_URLS)
def test_check_refuses_a_service_url_that_is_not_http(url: str) -> None:
    stderr = _one_line_usage_error(cli("check", url, "--json"))
    assert "service URL" in stderr
    assert "pw-in-url" not in stderr


@pytest.mark.parametrize("timeout", ["0", "inf", "nan", "1e9"])  # inf: OverflowError, a traceback
@pytest.mark.parametrize("command", [["check"], ["prebind", "--anonymous", "--domain", "a.b"]])
def test_a_timeout_prebinder_refuses_is_a_usage_error(command: list[str], timeout: str) -> None:
    stderr = _one_line_usage_error(
        cli(command[0], "http://127.0.0.1:1/http-bind", *command[1:], "--timeout", timeout)
    )
    assert "timeout" in stderr


def test_check_hints_at_domain_when_the_urls_host_is_no_xmpp_domain(prosody) -> None:
    """The README's SERVICE_URL, http://127.0.0.1:PORT/http-bind, alone: the domain defaults
    to 127.0.0.1, which Prosody refuses (improper-addressing). Say to pass --domain."""
    res = cli("check", prosody.service_url, "--json")
    assert res.returncode == 1, res.stderr
    report = json.loads(res.stdout)
    # (the server answered: reachable, but not for this domain)
    assert report["reachable"] is True and report["domain"] == "127.0.0.1"
    assert "improper-addressing" in report["error"] and "mechanisms" not in report
    assert "--domain" in report["hint"] and "127.0.0.1" in report["hint"]

    res = cli("check", prosody.service_url)
    assert res.returncode == 1, res.stderr
    hints = [line for line in res.stdout.splitlines() if line.strip().startswith("hint:")]
    assert len(hints) == 1 and "--domain" in hints[0], res.stdout
    # and what the hint says works
    assert cli("check", prosody.service_url, "--domain", prosody.domain).returncode == 0


def test_check_hints_at_domain_when_the_given_domain_is_not_served(prosody) -> None:
    res = cli("check", prosody.service_url, "--domain", "nope.example", "--json")
    assert res.returncode == 1, res.stderr
    report = json.loads(res.stdout)
    assert report["reachable"] is True and "error" in report
    assert "--domain" in report["hint"] and "nope.example" in report["hint"]


def test_check_hints_at_domain_on_ejabberd(ejabberd) -> None:
    """ejabberd 23.01 refuses an unknown domain with internal-server-error: a hint when the
    domain was the URL's host, none when it was given (that condition means other things)."""
    res = cli("check", ejabberd.service_url, "--json")
    report = json.loads(res.stdout)
    assert res.returncode == 1 and report["reachable"] is True and "--domain" in report["hint"]
    report = json.loads(
        cli("check", ejabberd.service_url, "--domain", ejabberd.domain, "--json").stdout
    )
    assert report["reachable"] is True and "hint" not in report


@pytest.mark.parametrize("command", [[], ["prebind"], ["check"], ["derive-password"]])
def test_help_is_plain_text(command: list[str]) -> None:
    """--help is read in a terminal: no reStructuredText markup (the module docstring's)."""
    res = cli(*command, "--help")
    assert res.returncode == 0 and res.stderr == ""
    assert res.stdout.startswith("usage: bosh-middleware")
    assert "``" not in res.stdout
    description = res.stdout.split("\n\n")[1]  # after the usage lines
    assert not description.startswith(("positional", "options")), res.stdout
    assert "service_url" not in res.stdout  # a metavar, not the attribute name


def test_session_attributes_read_as_numbers_only_when_they_are() -> None:
    from bosh_middleware.cli import _number

    assert [_number(v) for v in ("59", "0", None, "", "²", "٣", "5s", "-1")] == [
        59,
        0,
        None,
        "",
        "²",  # (str.isdigit() is true of it, and int() refused it: check failed on it)
        "٣",
        "5s",
        "-1",
    ]
