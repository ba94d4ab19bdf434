"""One-command demo of bosh-middleware: a private Prosody + one of the example web apps.

    python examples/demo.py                       # Django example on http://127.0.0.1:8000/
    python examples/demo.py --framework flask     # or starlette
    python examples/demo.py --check               # headless end-to-end check, exit 0 / 1

It starts Prosody on 127.0.0.1 (BOSH on port 5280, or a free port if taken) with the demo users
alice and bob (each in the other's roster), whose XMPP passwords are derived from a secret made
up for this run (``bosh_middleware.derive_password``): the web app only knows the secret. Then
it runs the example app on 127.0.0.1:8000 (or a free port). Log in as alice in one browser and
as bob in a private window, and chat. Ctrl-C stops everything; nothing is left running and the
temporary directory (Prosody's data, the Django database) is removed.

``--check`` does the same headless (Playwright + /usr/bin/chromium): alice and bob log in
through the real login form, both pages attach and connect, a message goes each way through the
UI (with ``--framework flask`` also from the converse.js page); bounded to 60 s.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bosh_demo import DEMO_USERS, DOMAIN, STROPHE_DIST
from bosh_demo.apps import FRAMEWORKS, AppStartError, ExampleApp
from bosh_demo.check import CHROMIUM
from bosh_demo.xmpp import DemoProsody, XMPPStartError

CHECK_BUDGET_S = 58.0  # hard limit of --check, start-up and clean-up included
FRAMEWORK_MODULES = {
    "django": ["django"],
    "flask": ["flask", "flask_login"],
    "starlette": ["starlette", "itsdangerous", "uvicorn"],
}


class Stop(Exception):
    """A signal asked us to stop (SIGTERM, SIGHUP; SIGINT is KeyboardInterrupt)."""


class OutOfTime(Exception):
    """The --check budget ran out."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


def _raise_out_of_time(signum: int, frame: FrameType | None) -> None:
    raise OutOfTime(f"--check did not finish within {CHECK_BUDGET_S:.0f} s")


def missing_prerequisites(framework: str, check: bool) -> list[str]:
    problems = []
    if not (STROPHE_DIST / "strophe.umd.min.js").is_file():
        problems.append("node_modules/strophe.js is missing: run `npm ci` at the repository root")
    if framework == "flask" and not (STROPHE_DIST.parent.parent / "converse.js" / "dist").is_dir():
        problems.append("node_modules/converse.js is missing: run `npm ci` at the repository root")
    if shutil.which("prosody") is None:
        problems.append(
            "Prosody is not installed: `scripts/setup.sh --demo` or "
            "`apt-get install prosody` (then stop its stock service)"
        )
    for module in ["bosh_middleware", *FRAMEWORK_MODULES[framework]]:
        if importlib.util.find_spec(module) is None:
            problems.append(
                f"Python module {module!r} is missing: `scripts/setup.sh --demo` installs"
                " what every --framework needs"
            )
    if check and not os.access(CHROMIUM, os.X_OK):
        problems.append(f"Chromium is missing at {CHROMIUM}: `apt-get install chromium`")
    if check and importlib.util.find_spec("playwright") is None:
        problems.append(
            "Playwright is missing (`scripts/setup.sh --demo --check`, or `pip install "
            "playwright`; it uses /usr/bin/chromium: never `playwright install`)"
        )
    return problems


def run_check(app: ExampleApp, framework: str, deadline: float) -> None:
    from bosh_demo.check import check_chat, launch_chromium
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            check_chat(
                browser,
                app.url,
                timeout_s=max(5.0, deadline - time.monotonic() - 4),
                converse=framework == "flask",
                progress=print,
            )
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="One-command demo: Prosody + a bosh-middleware example web app.",
        epilog="Log in as alice / wonderland in one browser and bob / builder in a private window.",
    )
    parser.add_argument(
        "--framework",
        choices=FRAMEWORKS,
        default="django",
        help="which example app to run (default: django)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="run the end-to-end check in headless Chromium and exit (0 = pass)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="web port on 127.0.0.1 (default: 8000, or a free one)",
    )
    parser.add_argument(
        "--xmpp-port",
        type=int,
        default=None,
        help="BOSH port on 127.0.0.1 (default: 5280, or a free one)",
    )
    parser.add_argument("--verbose", action="store_true", help="show the web server's access log")
    args = parser.parse_args(argv)

    problems = missing_prerequisites(args.framework, args.check)
    if problems:
        print("demo: cannot start:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 1

    t0 = time.monotonic()
    deadline = t0 + CHECK_BUDGET_S
    old_handlers = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    if args.check:
        signal.signal(signal.SIGALRM, _raise_out_of_time)
        signal.alarm(int(CHECK_BUDGET_S))
    workdir = Path(tempfile.mkdtemp(prefix="bosh-demo-"))
    xmpp: DemoProsody | None = None
    app: ExampleApp | None = None
    try:
        secret = secrets.token_urlsafe(32)
        # XMPP passwords derived from the secret: the web app can compute them, stores none.
        from bosh_middleware import derive_password

        xmpp_users = {name: derive_password(secret, f"{name}@{DOMAIN}") for name in DEMO_USERS}
        # Assigned before start(): a signal during start-up still finds it to stop.
        xmpp = DemoProsody(workdir / "prosody", xmpp_users, http_port=args.xmpp_port)
        xmpp.start()
        print(f"Prosody: BOSH on {xmpp.service_url} (users {', '.join(DEMO_USERS)})", flush=True)
        app = ExampleApp(
            args.framework,
            xmpp.service_url,
            secret,
            port=args.port,
            workdir=workdir,
            quiet=args.check or not args.verbose,
            log_path=workdir / "app.log" if args.check else None,
        )
        app.start()
        if args.check:
            print(
                f"{args.framework} example: {app.url} ({time.monotonic() - t0:.1f} s); "
                "checking in headless Chromium:",
                flush=True,
            )
            run_check(app, args.framework, deadline)
            print(f"demo --check: OK ({args.framework}, {time.monotonic() - t0:.1f} s)")
            return 0
        logins = ", ".join(f"{name} / {pw}" for name, pw in DEMO_USERS.items())
        lines = [
            f"bosh-middleware demo ({args.framework}) is running: {app.url}",
            f"Log in as alice in one browser and as bob in a private window ({logins}),",
            "and chat.",
        ]
        if args.framework == "flask":
            lines.append(f"The converse.js page: {app.url}converse")
        lines.append("Ctrl-C stops everything.")
        print("\n" + "\n".join("  " + line for line in lines) + "\n", flush=True)
        while True:
            time.sleep(0.5)
            if not xmpp.is_running():
                print(f"demo: Prosody stopped unexpectedly\n{xmpp.log_tail()}", file=sys.stderr)
                return 1
            if app.returncode() is not None:
                print(
                    f"demo: the {args.framework} app exited ({app.returncode()})", file=sys.stderr
                )
                return 1
    except KeyboardInterrupt:
        print("\ndemo: stopping…", flush=True)
        return 0 if not args.check else 1
    except Stop as exc:
        print(f"demo: {exc}: stopping…", flush=True)
        return 0 if not args.check else 1
    except (XMPPStartError, AppStartError) as exc:
        print(f"demo: FAILED: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the check's reasons (CheckFailed), OutOfTime, anything else
        what = "FAILED" if args.check else "error"
        print(f"demo: {what}: {type(exc).__name__}: {exc}", file=sys.stderr)
        if args.check and app is not None:
            tail = "\n".join(app.log_text().splitlines()[-30:])
            if tail:
                print(f"--- {args.framework} app output ---\n{tail}", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
        # Ctrl-C during clean-up must not leave servers behind: ignore it until done.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for sig in old_handlers:
            signal.signal(sig, signal.SIG_IGN)
        try:
            if app is not None:
                app.stop()
            if xmpp is not None:
                xmpp.stop()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
