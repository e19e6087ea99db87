"""Fixtures for the browser tests: the real UI from `run.py ui`, driven by a headless Chromium through Playwright.

Playwright drives the system's Chromium (Debian's `chromium` package, which ./test.sh installs), never a
browser of its own. Without one the tests skip, with the reason; under CI=true they fail instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import httpx
import pytest

from monitor_ui.auth import SESSION_COOKIE
from tests.conftest import ADMIN_KEY, Keyrotor

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page

DESKTOP = (1280, 800)


def unavailable(reason: str) -> NoReturn:
    """Skip on a developer's machine; fail in CI, where a missing browser means a broken install step."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: browser tests must run)", pytrace=False)
    pytest.skip(reason)


def chromium_executable() -> str:
    """KEYROTOR_CHROMIUM, else Debian's chromium (on PATH or in /usr/bin); skip or fail without one."""
    override = os.environ.get("KEYROTOR_CHROMIUM")
    if override:
        if not os.access(override, os.X_OK):
            unavailable(f"KEYROTOR_CHROMIUM={override} is not an executable file")
        return override
    found = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if found is None:
        unavailable(
            "no Chromium found (chromium on PATH, /usr/bin/chromium or KEYROTOR_CHROMIUM): ./test.sh installs"
            " Debian's chromium package when run as root or with passwordless sudo"
        )
    return found


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    # Module scope, not session: while Playwright's sync API is open, its event loop counts as running in
    # this thread, and tests elsewhere that call asyncio.run() would fail.
    executable = chromium_executable()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("the playwright package is missing: ./test.sh installs requirements-dev.txt")
    # Chromium's sandbox refuses to start as root, which is how CI runs.
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=args)
        yield browser
        browser.close()


@dataclass
class BrowserEvents:
    """What the pages of one test did that a user would notice, or that shows a page is broken."""

    dialogs: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    # What the user answers to a confirm(): dismissed unless a test says yes.
    accept_dialogs: bool = False

    def csp_violations(self) -> list[str]:
        return [text for text in self.console_errors if "Content Security Policy" in text]

    def watch(self, page: Page) -> None:
        def on_dialog(dialog) -> None:
            self.dialogs.append(f"{dialog.type}: {dialog.message}")
            if self.accept_dialogs:
                dialog.accept()
            else:
                dialog.dismiss()

        def on_console(message: ConsoleMessage) -> None:
            if message.type == "error":
                self.console_errors.append(f"{page.url}: {message.text}")

        page.on("dialog", on_dialog)
        page.on("console", on_console)
        page.on("pageerror", lambda error: self.page_errors.append(f"{page.url}: {error}"))


@pytest.fixture
def browser_events() -> BrowserEvents:
    return BrowserEvents()


@pytest.fixture
def ui(keyrotor: Keyrotor) -> Keyrotor:
    """The keyrotor installation with its monitor UI started (the proxy only when a test starts it)."""
    keyrotor.start_ui()
    return keyrotor


def log_in(context: BrowserContext, ui_url: str) -> None:
    """Give the browser a session cookie from the real login endpoint.

    The form itself is exercised by test_an_admin_finds_a_streamed_flow_by_search_and_its_markup_never_runs;
    the other tests only need to be logged in.
    """
    response = httpx.post(f"{ui_url}/login", data={"admin_key": ADMIN_KEY, "next": "/flows"}, timeout=10)
    assert response.status_code == 303, response.text
    cookie = {"name": SESSION_COOKIE, "value": response.cookies[SESSION_COOKIE], "url": ui_url}
    context.add_cookies([{**cookie, "httpOnly": True, "sameSite": "Strict"}])


@pytest.fixture
def new_page(chromium: Browser, ui: Keyrotor, browser_events: BrowserEvents) -> Iterator[Callable[..., Page]]:
    """Open a page on the UI in a fresh browser context: logged in unless asked otherwise."""
    contexts: list[BrowserContext] = []

    def make(width: int = DESKTOP[0], height: int = DESKTOP[1], logged_in: bool = True, touch: bool = False) -> Page:
        context = chromium.new_context(
            viewport={"width": width, "height": height}, base_url=ui.ui_url, has_touch=touch, is_mobile=touch
        )
        context.set_default_timeout(15_000)
        contexts.append(context)
        if logged_in:
            log_in(context, ui.ui_url)
        page = context.new_page()
        browser_events.watch(page)
        if logged_in:
            page.goto("/flows")
        return page

    yield make
    for context in contexts:
        context.close()


@pytest.fixture
def page(new_page: Callable[..., Page]) -> Page:
    """A desktop-sized page, logged in, showing the flow list."""
    return new_page()
