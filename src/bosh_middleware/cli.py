"""``bosh-middleware``: prebind from a shell, and diagnose a BOSH endpoint.

Most prebind trouble in the wild is server configuration (PLAIN hidden over http, a wait above
what browsers tolerate, missing CORS headers), so ``check`` says what the endpoint offers and
what of it will bite.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from . import scram
from .client import Prebinder
from .credentials import (
    Credentials,
    derive_password,
    escape_localpart,
    is_bare_domain,
    unescape_localpart,
)
from .errors import AuthenticationFailed, BOSHError, MechanismUnavailable
from .http11 import check_url, redact_url
from .protocol import NO_MECHANISMS_HINT, is_secure_transport

__all__ = ["main"]

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_AUTH = 3


#: What ``--help`` opens with. Plain text, not the module docstring: argparse prints its text as
#: is, and the docstring's reStructuredText markup (double backquotes) would show as noise.
DESCRIPTION = """\
Prebind an XMPP session over BOSH from a shell, and diagnose a BOSH endpoint.

Most prebind trouble in the wild is server configuration (PLAIN hidden over
plain http, a wait above what browsers tolerate, missing CORS headers), so
"check" says what an endpoint offers and what of it will bite.
"""

EPILOG = """\
exit status: 0 success, 1 failure (endpoint unreachable or refusing), 2 usage
error, 3 login refused. Run "bosh-middleware COMMAND --help" for a command's
options.
"""

#: Conditions a server ends a session request with when its ``to`` names no domain it serves:
#: Prosody answers ``improper-addressing``; RFC 6120 and XEP-0124 name ``host-unknown``,
#: ``host-gone`` and ``remote-connection-failed`` for it. ``check`` defaults the domain to the
#: URL's host (often ``127.0.0.1``), so these are what a user sees first and need a way out.
WRONG_DOMAIN_CONDITIONS = frozenset(
    {"improper-addressing", "host-unknown", "host-gone", "remote-connection-failed"}
)

#: ejabberd (23.01) answers ``internal-server-error`` for a domain it does not serve. That
#: condition also means other things, so it only earns a hint when the domain was a guess.
WRONG_GUESSED_DOMAIN_CONDITIONS = WRONG_DOMAIN_CONDITIONS | {"internal-server-error"}


def _options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {"timeout": args.timeout}
    if getattr(args, "mechanism", None):
        opts["mechanisms"] = tuple(args.mechanism)
    if getattr(args, "allow_insecure_plain", False):
        opts["allow_insecure_plain"] = True
    return opts


def _refused(exc: BOSHError) -> bool:
    """Whether the server refused the login (exit 3). No mechanism that is both offered and
    allowed (``MechanismUnavailable``, an ``AuthenticationFailed`` to the middleware) is no
    refusal: nothing was tried, and a script reading 3 as "wrong password" would look in the
    wrong place."""
    return isinstance(exc, AuthenticationFailed) and not isinstance(exc, MechanismUnavailable)


def _usage(message: str) -> int:
    """A mistake in the command line: one line on stderr, not a traceback."""
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _service_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a BOSH service URL, or ``None``: checked before anything is sent,
    so that a typo (``notaurl``, ``ftp://``, a port that is not a number, an empty DNS label)
    is a usage error on one line, as a malformed ``--jid`` is, and not a connection failure
    that blames the network. The message shows the URL without its password."""
    try:
        check_url(url)
    except ValueError as exc:
        return f"service URL: {exc}"
    return None


def _prebinder(url: str, **options: Any) -> Prebinder | str:
    """A ``Prebinder`` for ``url``, or why the command line cannot make one (a message for
    ``_usage``). ``Prebinder`` refuses bad settings (``--timeout 0``) with ``ValueError``; only
    its construction is guarded, so that a ``ValueError`` from a bug later on still shows."""
    problem = _service_url_problem(url)
    if problem is not None:
        return problem
    try:
        return Prebinder(url, **options)
    except ValueError as exc:
        return str(exc)


def _password_credentials(jid: str, resource: str | None = None) -> Credentials | int:
    """``jid`` with the password of ``$BOSH_PASSWORD`` (never the command line, which other
    users of the machine can read), or the exit code of a usage error, already reported."""
    password = os.environ.get("BOSH_PASSWORD")
    if not password:
        return _usage("set the password in the BOSH_PASSWORD environment variable")
    try:
        return Credentials(jid, password, resource=resource)
    except ValueError as exc:  # (the message names the JID, never the password)
        return _usage(f"--jid: {exc}")


def _cmd_prebind(args: argparse.Namespace) -> int:
    # The URL first, as ``check`` does: a wrong one is the mistake to hear of, not a missing
    # password that, once set, only leads to it.
    problem = _service_url_problem(args.service_url)
    if problem is not None:
        return _usage(problem)
    if args.anonymous:
        if not args.domain:
            print("error: --anonymous needs --domain", file=sys.stderr)
            return EXIT_USAGE
        try:
            creds = Credentials.anonymous(args.domain)
        except ValueError as exc:
            return _usage(f"--domain: {exc}")
        if args.resource is not None:  # (an anonymous login binds one as any other does)
            try:
                creds = dataclasses.replace(creds, resource=args.resource)
            except ValueError as exc:
                return _usage(f"--resource: {exc}")
    else:
        if not args.jid:
            print("error: give --jid (and BOSH_PASSWORD) or --anonymous --domain", file=sys.stderr)
            return EXIT_USAGE
        # A resource typed in --jid is the one to bind, as --resource is: Credentials binds
        # only its ``resource`` (a fresh random one otherwise), and would drop it unsaid.
        typed = args.jid.partition("/")[2] if "/" in args.jid else None
        if typed is not None and args.resource not in (None, typed):
            return _usage(
                f"--jid names the resource '{typed}' and --resource '{args.resource}': give one"
            )
        made = _password_credentials(args.jid, args.resource or typed)
        if isinstance(made, int):
            return made
        creds = made
    prebinder = _prebinder(args.service_url, **_options(args))
    if isinstance(prebinder, str):
        return _usage(prebinder)
    try:
        with prebinder:
            session = prebinder.prebind(creds)
    except MechanismUnavailable as exc:
        allowed = f" (--mechanism allows {', '.join(args.mechanism)})" if args.mechanism else ""
        print(f"error: cannot log in: {exc}{allowed}", file=sys.stderr)
        return EXIT_FAILED
    except AuthenticationFailed as exc:
        print(f"error: authentication failed ({exc.condition}): {exc}", file=sys.stderr)
        return EXIT_AUTH
    except BOSHError as exc:
        print(f"error: {type(exc).__name__} ({exc.condition}): {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(session.as_dict()))
    return 0


#: The Origin of the CORS preflight ``check`` sends: a made-up page origin, which a server
#: that allows any (Prosody's default) echoes back.
CHECK_ORIGIN = "https://app.example"


def _cors(url: str, timeout: float) -> dict[str, str | None]:
    headers = {
        "Origin": CHECK_ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    try:
        r = httpx.options(url, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    names = (
        "access-control-allow-origin",
        "access-control-allow-methods",
        "access-control-allow-headers",
    )
    return {
        "preflight_origin": CHECK_ORIGIN,
        "status": str(r.status_code),
        **{n: r.headers.get(n) for n in names},
    }


def _wrong_domain_hint(condition: str | None, domain: str, guessed: bool) -> str | None:
    """What to do when the server's refusal means it serves no XMPP domain ``domain``, or
    ``None``. Without it a user who followed the README (``check`` on the service URL alone)
    reads ``reachable: False`` about a server that answered, and looks for a network fault."""
    if condition in WRONG_DOMAIN_CONDITIONS:
        refused = "the server does not serve"
    elif guessed and condition in WRONG_GUESSED_DOMAIN_CONDITIONS:
        refused = "the server may not serve"
    else:
        return None
    default = " (the URL's host, the default)" if guessed else ""
    return (
        f"{refused} the XMPP domain '{domain}'{default}: pass --domain <your XMPP domain>, "
        "the part after @ in your users' JIDs"
    )


#: Logins ``check --jid`` makes with one engine: the first learns what the server offers, the
#: second tries quickstart (and pipelining), the third shows what stays on.
_CHECK_LOGINS = 3


def _check_login(url: str, creds: Credentials, timeout: float) -> tuple[dict[str, Any], int]:
    """Log in ``_CHECK_LOGINS`` times with one engine, as a web process would, and say what
    the warm prebind costs here: whether the server takes quickstart and pipelining (the
    README's "Round trips"). Each session is ended at once. (The report, and the exit code.)"""
    prebinder = Prebinder(url, timeout=timeout)
    # (httpx, which does not pipeline, where a proxy is set in the environment)
    transport = "builtin" if prebinder.memory.pipelining else "httpx"
    login: dict[str, Any] = {"jid": creds.jid, "transport": transport}
    trips: list[int] = []
    derived: list[int] = []  # PBKDF2 runs per login: more than the first's, a re-salting server
    try:
        with prebinder:
            for _ in range(_CHECK_LOGINS):
                before = scram.derivations()
                session = prebinder.prebind(creds)
                derived.append(scram.derivations() - before)
                trips.append(session.round_trips)
                login["mechanism"] = session.mechanism
                prebinder.terminate(session)
    except BOSHError as exc:
        login["error"] = f"{type(exc).__name__} ({exc.condition}): {exc}"
        code = EXIT_AUTH if _refused(exc) else EXIT_FAILED
        return login, code
    domain = creds.domain
    login.update(
        round_trips=trips,
        quickstart=prebinder.memory.quickstart(domain) is not None,
        pipelining=prebinder.memory.pipelines(domain),
    )
    if str(login.get("mechanism", "")).startswith("SCRAM-"):
        login.update(key_derivations=derived, pbkdf2=scram.pbkdf2_backend())
    return login, 0


def _resalting_warning(backend: str) -> str:
    """What to say when every SCRAM login needed a key derivation of its own."""
    return (
        "the server salts every SCRAM login afresh (a plain password store, such as Prosody's "
        "internal_plain): every prebind runs PBKDF2 in the web process"
        + (
            " (install bosh-middleware[speedups] for cryptography's, about twice as fast)"
            if backend == "hashlib"
            else ""
        )
        + "; with hashed storage (Prosody's default) repeat logins skip it"
    )


def _number(value: str | None) -> int | str | None:
    """A session attribute as a number, or as the server sent it if it is none (ASCII
    digits only: ``str.isdigit`` is true of "²" too, which ``int`` refuses)."""
    if value and value.isascii() and value.isdigit():
        return int(value)
    return value


def _cmd_check(args: argparse.Namespace) -> int:
    prebinder = _prebinder(args.service_url, timeout=args.timeout)
    if isinstance(prebinder, str):
        return _usage(prebinder)
    creds: Credentials | None = None
    if args.jid:
        made = _password_credentials(args.jid)
        if isinstance(made, int):
            return made
        creds = made
    guessed = not args.domain and creds is None
    domain = args.domain or (creds.domain if creds else urlsplit(args.service_url).hostname or "")
    # (printed, and so without the password of a user:password@ in the URL)
    report: dict[str, Any] = {"service_url": redact_url(args.service_url), "domain": domain}
    warnings: list[str] = []
    started = time.perf_counter()
    try:
        with prebinder:
            info = prebinder.probe(domain)
    except BOSHError as exc:
        hint = _wrong_domain_hint(exc.condition, domain, guessed)
        # (a refusal of the domain is an answer: the endpoint is there, the domain is wrong)
        report.update(
            reachable=hint is not None, error=f"{type(exc).__name__} ({exc.condition}): {exc}"
        )
        if hint is not None:
            report["hint"] = hint
        info = None
    report["elapsed_ms"] = round((time.perf_counter() - started) * 1000, 1)
    if info is not None:
        a = info.attrs
        report.update(
            reachable=True,
            mechanisms=info.mechanisms,
            features=info.features,
            ver=a.get("ver"),
            # (numbers and a boolean in the JSON, as what reads it expects; as sent if not)
            **{
                k: _number(a.get(k))
                for k in ("wait", "inactivity", "requests", "hold", "polling", "maxpause")
            },
            secure={"true": True, "false": False}.get(a.get("secure", ""), a.get("secure")),
        )
        if not info.mechanisms:
            # (not a wrong domain: Prosody refuses one with improper-addressing)
            warnings.append(f"no SASL mechanisms offered: {NO_MECHANISMS_HINT}")
        if (
            "PLAIN" not in info.mechanisms
            and not any(m.startswith("SCRAM-") for m in info.mechanisms)
            and "ANONYMOUS" not in info.mechanisms
        ):
            warnings.append("neither PLAIN nor SCRAM offered: password logins cannot work")
        if "PLAIN" in info.mechanisms and not is_secure_transport(args.service_url):
            warnings.append("PLAIN offered over plain http to a non-loopback host: use https")
        wait = report["wait"]
        if isinstance(wait, int) and wait > 60:
            warnings.append(f"wait={wait} s: browser clients abort long polls after ~66 s")
        requests = report["requests"]
        if isinstance(requests, int) and requests < 2:
            warnings.append("requests < 2: no pipelining, prebinds take more round trips")
        inactivity = report["inactivity"]
        if isinstance(inactivity, int) and inactivity < 20:
            warnings.append(f"inactivity={inactivity} s: pages must attach very quickly")
    report["cors"] = cors = _cors(args.service_url, args.timeout)
    if not cors.get("access-control-allow-origin"):
        warnings.append("no CORS headers: browsers can only use this endpoint from the same origin")
    code = 0 if info is not None else EXIT_FAILED
    if creds is not None and info is not None:
        login, code = _check_login(args.service_url, creds, args.timeout)
        report["login"] = login
        if code == 0 and not login["quickstart"]:
            warnings.append(
                "the server does not answer a SASL message sent with the session creation "
                "request (quickstart): every prebind takes 3-4 round trips"
            )
        elif (
            code == 0
            and not login["pipelining"]
            and str(login.get("mechanism", "")).startswith("SCRAM-")
        ):
            warnings.append(
                "SCRAM's last message is not pipelined with the restart + bind here"
                + (" (httpx, behind a proxy)" if login["transport"] == "httpx" else "")
                + ": warm prebinds take 3 round trips, not 2"
            )
        if code == 0 and all(login.get("key_derivations", [0, 0])[1:]):
            warnings.append(_resalting_warning(login["pbkdf2"]))
    report["warnings"] = warnings
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            if key == "warnings":
                continue
            print(f"{key:>12}: {value}")
        for w in warnings:
            print(f"     warning: {w}")
    return code


def _cmd_derive(args: argparse.Namespace) -> int:
    secret = os.environ.get("BOSH_SHARED_SECRET")
    if not secret:
        print("error: set the shared secret in BOSH_SHARED_SECRET", file=sys.stderr)
        return EXIT_USAGE
    problem = _shared_secret_jid_problem(args.jid)
    if problem is not None:
        return _usage(problem)
    print(derive_password(secret, args.jid))
    return 0


def _shared_secret_jid_problem(jid: str) -> str | None:
    """Why ``jid`` is no JID ``SharedSecretCredentials`` builds, or ``None``.

    A password for such a JID would belong to no web user (and ``alice smith@example.org`` is
    not even a JID a server accepts), so it is refused, with the escaped JID to use when the
    mistake is an unescaped username.
    """
    local, at, domain = jid.rpartition("@")
    if not (at and local and is_bare_domain(domain)):
        return f"--jid: not a bare user JID (localpart@domain): '{jid}'"
    try:
        unescape_localpart(local)
    except ValueError as exc:
        problem = f"--jid: SharedSecretCredentials escapes localparts (XEP-0106): {exc}"
        try:  # the localpart may be the username itself, unescaped
            return (
                f"{problem}; for the username '{local}', use '{escape_localpart(local)}@{domain}'"
            )
        except ValueError:
            return problem
    return None


def build_parser() -> argparse.ArgumentParser:
    # (raw: the description's paragraphs and the epilog's lines are already wrapped)
    parser = argparse.ArgumentParser(
        prog="bosh-middleware",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    url_help = "the BOSH service URL (http:// or https://)"
    timeout_help = "seconds to wait for each HTTP request (default: %(default)s)"

    p = sub.add_parser(
        "prebind",
        help="prebind a session and print {jid, sid, rid} as JSON",
        description="Log in over BOSH and print the session as one line of JSON "
        '({"jid", "sid", "rid"}) for a browser client to attach to. The password is read '
        "from the BOSH_PASSWORD environment variable, never from the command line.",
    )
    p.add_argument("service_url", metavar="URL", help=url_help)
    p.add_argument(
        "--jid", help="the account to log in as; its password is read from $BOSH_PASSWORD"
    )
    p.add_argument(
        "--anonymous", action="store_true", help="log in with SASL ANONYMOUS (needs --domain)"
    )
    p.add_argument("--domain", help="with --anonymous: the server's anonymous host")
    p.add_argument(
        "--resource",
        help="bind this resource instead of a random one (as does a full --jid, user@host/res)",
    )
    p.add_argument(
        "--mechanism",
        action="append",
        help="allow only this SASL mechanism, e.g. SCRAM-SHA-1 (repeatable)",
    )
    p.add_argument(
        "--allow-insecure-plain",
        action="store_true",
        help="allow PLAIN over plain http:// to a host other than this machine",
    )
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help=timeout_help)
    p.set_defaults(func=_cmd_prebind)

    c = sub.add_parser(
        "check",
        help="report what a BOSH endpoint offers",
        description="Open a session on a BOSH endpoint and report what it offers (SASL "
        "mechanisms, wait, inactivity, requests, CORS headers), with warnings about what will "
        "bite browser clients. With --jid, also log in and report what a prebind costs there.",
    )
    c.add_argument("service_url", metavar="URL", help=url_help)
    c.add_argument(
        "--domain",
        help="the XMPP domain to ask for, the part after @ in your users' JIDs "
        "(default: the URL's host, rarely right for an address such as 127.0.0.1)",
    )
    c.add_argument(
        "--jid",
        help="also log in as this account (its password read from $BOSH_PASSWORD) three times "
        "with one engine, and report the round trips and whether quickstart and pipelining "
        "hold; its domain is the default --domain",
    )
    c.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help=timeout_help)
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(func=_cmd_check)

    d = sub.add_parser(
        "derive-password",
        help="the password SharedSecretCredentials uses ($BOSH_SHARED_SECRET)",
        description="Print the XMPP password SharedSecretCredentials derives for a JID, to "
        "provision the account with. The secret is read from $BOSH_SHARED_SECRET.",
    )
    d.add_argument(
        "--jid",
        required=True,
        help="the JID as SharedSecretCredentials builds it: the username lower-cased and "
        "XEP-0106-escaped (a space as \\20, @ as \\40, / as \\2f, a backslash as \\5c, "
        "...), then @domain; "
        "e.g. 'alice\\20smith@example.org' for the username 'Alice Smith'",
    )
    d.set_defaults(func=_cmd_derive)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
