"""The examples under examples/, end to end: a private Prosody (examples/bosh_demo/xmpp.py, with
the demo users alice and bob and their shared roster), the example app as a child process on a
loopback port, and headless Chromium (fixture ``browser``) driving the real pages.

For each of django, flask and starlette: alice and bob log in through the app's login form in
their own browser contexts, both chat pages attach to the injected session and reach the
connected state, each sees the other online, and a message goes each way through the UI. For
flask also the converse.js page (``/bosh/prebind``), and a chat page the user leaves and comes
back to with Back (Chromium's back/forward cache on) or opens after Chromium loaded it ahead
of time (speculation rules). Finally ``examples/demo.py --check`` as a
subprocess: exit code 0, and none of the processes it started (Prosody, the web app, Chromium)
left running.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from bosh_demo import DEMO_USERS, DOMAIN  # noqa: E402
from bosh_demo.apps import ExampleApp  # noqa: E402
from bosh_demo.check import (  # noqa: E402
    CheckRun,
    check_chat,
    check_converse,
    login,
    wait_connected,
)
from bosh_demo.xmpp import DemoProsody, free_port  # noqa: E402

from support.browser import launch_browser  # noqa: E402

pytestmark = pytest.mark.browser

FRAMEWORK_MODULES = {
    "django": ("django",),
    "flask": ("flask", "flask_login"),
    "starlette": ("starlette", "itsdangerous", "uvicorn"),
}
CHECK_TIMEOUT_S = 45.0
DEMO_TIMEOUT_S = 90.0


def _missing(framework: str) -> str | None:
    # Only an env without web frameworks (tox "core") lacks these: nothing to test there.
    for module in FRAMEWORK_MODULES[framework]:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (the {framework} example needs it)"
    return None


def _needs(framework: str) -> pytest.MarkDecorator:
    reason = _missing(framework)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


@contextlib.contextmanager
def running_example(framework: str, workdir: Path) -> Iterator[tuple[DemoProsody, ExampleApp]]:
    """A fresh Prosody (alice and bob with derived passwords) and the example app on it."""
    from bosh_middleware import derive_password

    secret = secrets.token_urlsafe(24)
    users = {name: derive_password(secret, f"{name}@{DOMAIN}") for name in DEMO_USERS}
    xmpp = DemoProsody(workdir / "prosody", users, http_port=free_port())
    app = ExampleApp(
        framework,
        xmpp.service_url,
        secret,
        port=free_port(),
        workdir=workdir,
        log_path=workdir / f"{framework}.log",
    )
    try:
        xmpp.start()
        app.start()
        yield xmpp, app
    finally:
        try:
            app.stop()
        finally:
            xmpp.stop()


def _explain(exc: BaseException, xmpp: DemoProsody, app: ExampleApp) -> str:
    app_log = "\n".join(app.log_text().splitlines()[-40:])
    return f"{exc}\n--- app output ---\n{app_log}\n--- prosody ---\n{xmpp.log_tail(20)}"


@pytest.mark.parametrize(
    "framework", [pytest.param(name, marks=_needs(name)) for name in FRAMEWORK_MODULES]
)
def test_example_chat_between_two_logged_in_users(framework, browser, tmp_path):
    with running_example(framework, tmp_path) as (xmpp, app):
        try:
            steps = check_chat(browser, app.url, timeout_s=CHECK_TIMEOUT_S)
        except AssertionError as exc:
            pytest.fail(_explain(exc, xmpp, app), pytrace=False)
        assert app.returncode() is None, "the app died during the check"
    names = [what for what, _ in steps]
    assert any("alice's chat page attached and connected as alice@localhost/" in n for n in names)
    assert any("bob's chat page attached and connected as bob@localhost/" in n for n in names)
    assert names[-1] == "done"


@_needs("flask")
def test_flask_example_converse_page(browser, tmp_path):
    with running_example("flask", tmp_path) as (xmpp, app):
        try:
            steps = check_converse(browser, app.url, timeout_s=CHECK_TIMEOUT_S)
        except AssertionError as exc:
            pytest.fail(_explain(exc, xmpp, app), pytrace=False)
    names = [what for what, _ in steps]
    assert "alice's converse.js page connected through /bosh/prebind" in names
    assert any(n.startswith("alice's converse.js page received") for n in names)


@_needs("flask")
def test_a_chat_page_the_user_comes_back_to_connects_again(playwright_sync, tmp_path):
    """Chromium keeps a prebound page in its back/forward cache, no-store or not (Playwright
    turns that cache off, so its own Chromium here: real users have it on). Back showed the
    chat page as it was left, its session ended by chat.js's pagehide beacon: "Disconnected;
    reload the page". It must load again instead, with a session of its own."""
    browser = launch_browser(playwright_sync, ignore_default_args=["--disable-back-forward-cache"])
    try:
        with running_example("flask", tmp_path) as (xmpp, app):
            run = CheckRun(browser, app.url, time.monotonic() + CHECK_TIMEOUT_S, DEMO_USERS, DOMAIN)
            try:
                alice = login(run, "alice")
                first = wait_connected(run, alice)
                page = alice.page
                page.evaluate("() => { window.leftOnce = true; }")  # marks this document
                page.goto(app.url + "static/demo/chat.css", wait_until="load")
                page.go_back(wait_until="commit")
                try:
                    page.wait_for_function("() => !window.leftOnce", timeout=10_000)
                except Exception as exc:
                    state = page.locator("#xmpp-status").text_content()
                    raise AssertionError(f"Back showed the page as it was left: {state}") from exc
                kind = page.evaluate("() => performance.getEntriesByType('navigation')[0].type")
                assert kind == "reload", f"not restored from the back/forward cache: {kind}"
                second = wait_connected(run, alice)
            except AssertionError as exc:
                pytest.fail(_explain(exc, xmpp, app), pytrace=False)
            finally:
                run.close()
    finally:
        browser.close()
    assert second != first  # a session of its own, not the one the page was left with


@_needs("flask")
def test_a_chat_page_loaded_ahead_of_time_connects_when_opened(browser, tmp_path):
    """A page Chromium loads ahead of time (speculation rules, its address bar: Sec-Purpose)
    gets no session, and the browser shows that copy when the user opens it: the chat said
    "No XMPP session in this page". Opened, it must load again and get one."""
    with running_example("flask", tmp_path) as (xmpp, app):
        run = CheckRun(browser, app.url, time.monotonic() + CHECK_TIMEOUT_S, DEMO_USERS, DOMAIN)
        try:
            alice = login(run, "alice")
            wait_connected(run, alice)
            page = alice.page
            page.goto(app.url + "elsewhere")  # (a 404 page: any page of the site will do)
            # the chat page loaded ahead of time, and answered
            with page.expect_response(lambda r: bool(r.request.headers.get("sec-purpose"))):
                page.evaluate(
                    """() => {
                        const rules = document.createElement('script');
                        rules.type = 'speculationrules';
                        const rule = {source: 'list', urls: ['/']};
                        rules.textContent = JSON.stringify({prerender: [rule]});
                        const link = document.createElement('a');
                        link.href = '/';
                        link.id = 'chat-link';
                        link.textContent = 'chat';
                        document.body.append(rules, link);
                    }"""
                )
            page.click("#chat-link")
            wait_connected(run, alice)
        except AssertionError as exc:
            pytest.fail(_explain(exc, xmpp, app), pytrace=False)
        finally:
            run.close()


#: What each example hands the middleware as PUBLIC_SERVICE_URL, built from its own settings
#: (the middleware checks them as it is set up: Flask's at import, Starlette's with its stack).
PUBLIC_URL_OF = {
    "django": "import django; django.setup();"
    "from bosh_middleware.django.middleware import load_config;"
    "print(load_config().public_service_url)",
    "flask": "import app; print(app.app.config['BOSH_PUBLIC_SERVICE_URL'])",
    "starlette": "import app; app.app.build_middleware_stack(); print(app.PUBLIC_SERVICE_URL)",
}


@pytest.mark.parametrize(
    "framework", [pytest.param(name, marks=_needs(name)) for name in FRAMEWORK_MODULES]
)
def test_an_example_never_writes_the_service_urls_password_into_pages(
    framework: str, tmp_path: Path
) -> None:
    """PUBLIC_SERVICE_URL, in every page, defaulted to SERVICE_URL, which may carry the
    user:password@ of a proxy in front of the XMPP server; the default is that URL without."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BOSH_", "DJANGO_"))}
    env.update(
        BOSH_SERVICE_URL="http://web:topsecret@127.0.0.1:5280/http-bind",
        BOSH_SHARED_SECRET="s3cret",
        DJANGO_SETTINGS_MODULE="demo_site.settings",
        DJANGO_DB_PATH=str(tmp_path / "db.sqlite3"),
    )
    res = subprocess.run(
        [sys.executable, "-c", PUBLIC_URL_OF[framework]],
        cwd=EXAMPLES / framework,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "http://127.0.0.1:5280/http-bind"
    assert "topsecret" not in res.stdout


# --------------------------------------------------------------------------------------------
# examples/demo.py --check, as people run it
# --------------------------------------------------------------------------------------------


def _descendants(pid: int) -> list[tuple[int, float, str]]:
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            out.append((child.pid, child.create_time(), " ".join(child.cmdline())[:300]))
    return out


def _still_running(pid: int, created: float) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@_needs("django")
def test_demo_check_passes_and_leaves_nothing_running():
    pytest.importorskip("psutil")
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "demo.py"), "--check"],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    # Everything the demo starts (Prosody, its watchdog, the web app, Playwright's Chromium)
    # is its descendant while it runs; collect them to check that none outlives it.
    seen: dict[int, tuple[float, str]] = {}  # pid -> (create time, command lines seen)
    t0 = time.monotonic()
    while proc.poll() is None:
        if time.monotonic() - t0 > DEMO_TIMEOUT_S:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
            reader.join(5)
            proc.stdout.close()
            pytest.fail(f"demo.py --check ran over {DEMO_TIMEOUT_S:.0f} s:\n" + "".join(output))
        for pid, created, cmdline in _descendants(proc.pid):
            # Keep every command line: a fresh child shows its parent's until it execs.
            _, before = seen.get(pid, (created, ""))
            if cmdline not in before:
                seen[pid] = (created, f"{before} | {cmdline}" if before else cmdline)
        time.sleep(0.1)
    elapsed = time.monotonic() - t0
    reader.join(10)
    proc.stdout.close()
    text = "".join(output)
    assert proc.returncode == 0, f"demo.py --check exited with {proc.returncode}:\n{text}"
    assert "demo --check: OK" in text, text
    assert elapsed < 60, f"demo.py --check took {elapsed:.1f} s\n{text}"
    assert any("prosody" in cmdline and "bosh-demo-" in cmdline for _, cmdline in seen.values()), (
        f"never saw the demo's Prosody among its processes: {seen}"
    )
    deadline = time.monotonic() + 5  # the last of Chromium's helpers may take a moment
    leftovers = [(pid, c) for pid, (t, c) in seen.items() if _still_running(pid, t)]
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.2)
        leftovers = [(pid, c) for pid, (t, c) in seen.items() if _still_running(pid, t)]
    assert not leftovers, f"still running after demo.py --check: {leftovers}"
