"""The end-to-end check of an example, in headless Chromium (Playwright's sync API).

``check_chat(browser, base_url)``: alice and bob each log in through the app's real login form,
in their own browser context; both chat pages must reach the "connected" state (the page
attached to its prebound session and the server answered the roster request sent in the first
request after attach); each sees the other online; alice sends a message through the UI that
bob's page shows, and bob's answer shows up in alice's page.

``check_converse(...)`` (Flask example): alice's converse.js page gets a session from
``/bosh/prebind``, reaches "connected", and a message typed into converse reaches bob's page.

Every wait is bounded; a failure raises ``CheckFailed`` with the step, the pages' status lines
and the tail of the browser consoles.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import DEMO_USERS, DOMAIN

CHROMIUM = os.environ.get("BOSH_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


class CheckFailed(AssertionError):
    """The end-to-end check failed; the message says where and why."""


@dataclass
class UserPage:
    name: str
    context: Any
    page: Any


@dataclass
class CheckRun:
    browser: Any
    base_url: str
    deadline: float
    users: Mapping[str, str]
    domain: str
    logs: list[str] = field(default_factory=list)
    steps: list[tuple[str, float]] = field(default_factory=list)
    pages: dict[str, UserPage] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)
    progress: Callable[[str], None] | None = None

    def ms_left(self, cap_s: float | None = None) -> int:
        left = self.deadline - time.monotonic()
        if cap_s is not None:
            left = min(left, cap_s)
        return max(500, int(left * 1000))

    def step(self, what: str) -> None:
        elapsed = time.monotonic() - self.t0
        self.steps.append((what, elapsed))
        if self.progress is not None:
            self.progress(f"  {elapsed:5.1f}s  {what}")

    def fail(self, what: str, exc: BaseException | None = None) -> CheckFailed:
        lines = [f"{what} (after {time.monotonic() - self.t0:.1f} s)"]
        if exc is not None:
            lines.append(f"  cause: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        for up in self.pages.values():
            with contextlib.suppress(Exception):
                status = up.page.evaluate(
                    "() => { const s = document.getElementById('xmpp-status');"
                    " return s ? `${s.dataset.state}: ${s.textContent}` :"
                    " (document.body && document.body.dataset.xmppState) || '(no status)'; }"
                )
                lines.append(f"  {up.name}: {up.page.url} -> {status}")
        if self.logs:
            lines.append("--- browser console (last 60 lines) ---")
            lines += [line[:500] for line in self.logs[-60:]]
        return CheckFailed("\n".join(lines))

    def open(self, name: str) -> UserPage:
        context = self.browser.new_context()
        context.set_default_timeout(self.ms_left(20))
        page = context.new_page()

        def log(kind: str, text: str) -> None:
            self.logs.append(f"{time.monotonic() - self.t0:6.2f}s [{name}] {kind}: {text}")

        page.on("console", lambda msg: log(f"console.{msg.type}", msg.text))
        page.on("pageerror", lambda err: log("PAGE ERROR", str(err)))
        page.on(
            "requestfailed",
            lambda req: log("REQUEST FAILED", f"{req.method} {req.url} ({req.failure})"),
        )
        up = UserPage(name, context, page)
        self.pages[name] = up
        return up

    def no_page_errors(self) -> None:
        errors = [line for line in self.logs if "PAGE ERROR" in line]
        if errors:
            raise self.fail("uncaught JavaScript errors in the pages:\n  " + "\n  ".join(errors))

    def close(self) -> None:
        for up in self.pages.values():
            with contextlib.suppress(Exception):
                up.context.close()
        self.pages.clear()


@contextlib.contextmanager
def _run(
    browser: Any,
    base_url: str,
    timeout_s: float,
    users: Mapping[str, str] | None,
    domain: str,
    progress: Callable[[str], None] | None,
) -> Iterator[CheckRun]:
    run = CheckRun(
        browser,
        base_url.rstrip("/") + "/",
        time.monotonic() + timeout_s,
        dict(users or DEMO_USERS),
        domain,
        progress=progress,
    )
    try:
        yield run
    finally:
        run.close()


def login(run: CheckRun, name: str) -> UserPage:
    """Open the site in a fresh context and log in through its form (the site redirects there)."""
    up = run.open(name)
    page = up.page
    try:
        page.goto(run.base_url, wait_until="domcontentloaded", timeout=run.ms_left(20))
        page.locator("input[name=username]").fill(name, timeout=run.ms_left(10))
        page.locator("input[name=password]").fill(run.users[name], timeout=run.ms_left(10))
        with page.expect_navigation(wait_until="domcontentloaded", timeout=run.ms_left(20)):
            page.locator("form.login [type=submit]").click(timeout=run.ms_left(10))
    except Exception as exc:
        raise run.fail(f"{name} could not log in through the login form", exc) from None
    if page.locator("input[name=password]").count():
        raise run.fail(f"{name}'s login was refused (still on the login form)")
    run.step(f"{name} logged in ({page.url})")
    return up


def wait_connected(run: CheckRun, up: UserPage) -> str:
    """Until the chat page is connected; a final state (error, unavailable ...) fails at once."""
    states = ("connected", "error", "unavailable", "disconnected")
    selector = ", ".join(f"#chat[data-state={state}]" for state in states)
    try:
        up.page.wait_for_selector(selector, timeout=run.ms_left(25))
    except Exception as exc:
        raise run.fail(f"{up.name}'s chat page did not reach the connected state", exc) from None
    state = up.page.locator("#chat").get_attribute("data-state")
    if state != "connected":
        raise run.fail(f"{up.name}'s chat page ended up {state!r} instead of connected")
    me = str(up.page.locator("#me").text_content() or "")
    run.step(f"{up.name}'s chat page attached and connected as {me}")
    return me


def wait_online(run: CheckRun, up: UserPage, contact: str) -> None:
    sel = f'#roster li[data-jid="{contact}"][data-presence="online"]'
    try:
        up.page.wait_for_selector(sel, timeout=run.ms_left(15))
    except Exception as exc:
        raise run.fail(f"{up.name}'s roster does not show {contact} online", exc) from None
    run.step(f"{up.name} sees {contact} online")


def send(run: CheckRun, up: UserPage, to: str, text: str) -> None:
    page = up.page
    try:
        page.locator(f'#roster li[data-jid="{to}"] .contact-name').click(timeout=run.ms_left(10))
        page.locator("#message").fill(text, timeout=run.ms_left(10))
        page.locator("#message").press("Enter", timeout=run.ms_left(10))
        page.wait_for_selector(f'#messages li.message.out[data-to="{to}"]', timeout=run.ms_left(5))
    except Exception as exc:
        raise run.fail(f"{up.name} could not send a message to {to} through the UI", exc) from None
    run.step(f"{up.name} sent {text!r} to {to}")


def wait_message(run: CheckRun, up: UserPage, sender: str, text: str) -> None:
    loc = up.page.locator(f'#messages li.message.in[data-from="{sender}"] .body', has_text=text)
    try:
        loc.first.wait_for(timeout=run.ms_left(15))
    except Exception as exc:
        raise run.fail(
            f"{up.name}'s page did not show the message {text!r} from {sender}", exc
        ) from None
    run.step(f"{up.name} received {text!r}")


def _jid(run: CheckRun, name: str) -> str:
    return f"{name}@{run.domain}"


def check_chat(
    browser: Any,
    base_url: str,
    *,
    timeout_s: float = 45.0,
    users: Mapping[str, str] | None = None,
    domain: str = DOMAIN,
    converse: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[tuple[str, float]]:
    """Run the whole scenario; returns the steps with their times, raises ``CheckFailed``."""
    with _run(browser, base_url, timeout_s, users, domain, progress) as run:
        first, second = list(run.users)[:2]
        a, b = login(run, first), login(run, second)
        wait_connected(run, a)
        wait_connected(run, b)
        wait_online(run, a, _jid(run, second))
        wait_online(run, b, _jid(run, first))
        token = secrets.token_hex(3)
        hello = f"Hello {second}, this is {first} <{token}> ✓"
        send(run, a, _jid(run, second), hello)
        wait_message(run, b, _jid(run, first), hello)
        reply = f"Hi {first}! ({token})"
        send(run, b, _jid(run, first), reply)
        wait_message(run, a, _jid(run, second), reply)
        if converse:
            _converse_part(run, a, b, token)
        run.no_page_errors()
        run.step("done")
        return run.steps


def check_converse(
    browser: Any,
    base_url: str,
    *,
    timeout_s: float = 45.0,
    users: Mapping[str, str] | None = None,
    domain: str = DOMAIN,
    progress: Callable[[str], None] | None = None,
) -> list[tuple[str, float]]:
    """alice uses the converse.js page only, bob the Strophe chat page: converse connects
    through ``/bosh/prebind``, alice's message typed into converse reaches bob, and bob's answer
    shows up in converse."""
    with _run(browser, base_url, timeout_s, users, domain, progress) as run:
        first, second = list(run.users)[:2]
        a, b = login(run, first), login(run, second)
        wait_connected(run, b)
        token = secrets.token_hex(3)
        _converse_part(run, a, b, token, reply=True)
        run.no_page_errors()
        run.step("done")
        return run.steps


def _converse_part(
    run: CheckRun, a: UserPage, b: UserPage, token: str, *, reply: bool = False
) -> None:
    """alice opens the converse.js page (same browser context: same login) and writes to bob."""
    first, second = a.name, b.name
    page = a.context.new_page()
    run.pages[f"{first}-converse"] = UserPage(f"{first}-converse", a.context, page)

    def log(kind: str, text: str) -> None:
        run.logs.append(f"{time.monotonic() - run.t0:6.2f}s [{first}-converse] {kind}: {text}")

    page.on("console", lambda msg: log(f"console.{msg.type}", msg.text))
    page.on("pageerror", lambda err: log("PAGE ERROR", str(err)))
    page.on(
        "requestfailed",
        lambda req: log("REQUEST FAILED", f"{req.method} {req.url} ({req.failure})"),
    )
    try:
        page.goto(run.base_url + "converse", wait_until="domcontentloaded", timeout=run.ms_left(20))
        page.wait_for_selector("body[data-xmpp-state=connected]", timeout=run.ms_left(25))
    except Exception as exc:
        raise run.fail(f"{first}'s converse.js page did not connect", exc) from None
    run.step(f"{first}'s converse.js page connected through /bosh/prebind")
    peer = _jid(run, second)
    text = f"Via converse.js: hello {second} ({token})"
    try:
        contact = page.locator(f'a.open-chat[data-jid="{peer}"]').or_(
            page.locator("a.open-chat", has_text=second.capitalize())
        )
        contact.first.click(timeout=run.ms_left(20))
        box = page.locator("textarea.chat-textarea")
        box.first.fill(text, timeout=run.ms_left(15))
        box.first.press("Enter", timeout=run.ms_left(10))
    except Exception as exc:
        raise run.fail(f"{first} could not write to {peer} in converse.js", exc) from None
    run.step(f"{first} sent {text!r} from converse.js")
    wait_message(run, b, _jid(run, first), text)
    if not reply:
        return
    answer = f"Back to converse.js ({token})"
    send(run, b, _jid(run, first), answer)
    try:
        page.locator(".chat-msg__text", has_text=answer).first.wait_for(timeout=run.ms_left(15))
    except Exception as exc:
        raise run.fail(f"{first}'s converse.js page did not show {answer!r}", exc) from None
    run.step(f"{first}'s converse.js page received {answer!r}")


def launch_chromium(playwright: Any) -> Any:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        raise CheckFailed(f"Chromium not found at {CHROMIUM}: apt-get install chromium")
    return playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True, args=list(CHROMIUM_ARGS), timeout=30_000
    )
