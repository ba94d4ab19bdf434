"""pytest fixtures for the real-browser harness (see support/browser.py).

tests/conftest.py pulls them in with ``from support.browser_fixtures import *``.

* ``static_server`` (session): a started :class:`~support.browser.StaticServer` on 127.0.0.1.
* ``playwright_sync`` (session): the sync Playwright driver.
* ``browser`` (session): headless Debian Chromium (``/usr/bin/chromium``).
* ``harness_page`` (function): factory ``harness_page(url=None, name="page") -> HarnessPage``;
  every page it opened is closed after the test.

Missing prerequisites make these fixtures *fail* (never skip) with install instructions.
The sync Playwright API must not be used from inside a running asyncio loop: use these
fixtures from plain (sync) tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from support.browser import (
    HarnessPage,
    StaticServer,
    launch_browser,
    missing_prerequisites,
    open_page,
)

__all__ = ["browser", "harness_page", "playwright_sync", "static_server"]


def _require(**kwargs: bool) -> None:
    problems = missing_prerequisites(**kwargs)
    if problems:
        pytest.fail(
            "browser test harness prerequisites missing:\n  - " + "\n  - ".join(problems),
            pytrace=False,
        )


@pytest.fixture(scope="session")
def static_server() -> Iterator[StaticServer]:
    _require(need_browser=False)
    server = StaticServer().start()
    try:
        yield server
    finally:
        server.stop()


# Module scope, not session: while the sync Playwright API is started it leaves an event loop
# running on the main thread, which breaks asyncio.run() and pytest-asyncio tests that come later.
# Stopped at the end of each module, it only affects async tests in a module that also drives
# the browser (put those before the browser tests or run them on a worker thread).
@pytest.fixture(scope="module")
def playwright_sync() -> Iterator[Any]:
    _require(need_assets=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="module")
def browser(playwright_sync: Any) -> Iterator[Any]:
    b = launch_browser(playwright_sync)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def harness_page(browser: Any, static_server: StaticServer) -> Iterator[Callable[..., HarnessPage]]:
    opened: list[HarnessPage] = []

    def make(url: str | None = None, name: str = "page", **kwargs: Any) -> HarnessPage:
        hp = open_page(browser, url or static_server.harness_url, name=name, **kwargs)
        opened.append(hp)
        return hp

    yield make
    for hp in opened:
        hp.close()
