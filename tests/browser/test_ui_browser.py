"""The monitor UI in a real browser: logging in, a captured stream shown as text, a phone-sized screen.

The flows are made by the official openai client through a real proxy, so the pages show what a user
would see. The screenshots in docs/screenshots/ (used by the README) are taken here, on every run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import openai
import pytest

from tests.conftest import ADMIN_KEY, ROOT, Keyrotor, wait_for

if TYPE_CHECKING:
    from playwright.sync_api import Page

    from tests.browser.conftest import BrowserEvents

expect = pytest.importorskip("playwright.sync_api", reason="./test.sh installs playwright").expect
pytestmark = pytest.mark.browser

SCREENSHOTS = ROOT / "docs" / "screenshots"
KEYS = ["sk-good-browser-aaaaaaaaaaaaaaaaaaaa0001", "sk-good-browser-bbbbbbbbbbbbbbbbbbbb0002"]
SCRIPT_PAYLOAD = "<script>window.__xss=1</script>"
IMG_PAYLOAD = '<img src=x onerror="window.__xss=2">'
EVIL_MESSAGE = f"Summarise this page: {SCRIPT_PAYLOAD} {IMG_PAYLOAD}"


@dataclass
class Captured:
    streamed_id: int
    streamed_text: str


@pytest.fixture
def captured(ui: Keyrotor) -> Captured:
    """Two requests through a real proxy: a plain one, then a stream whose prompt carries markup."""
    ui.add_keys(*KEYS)
    client_key = ui.add_client("alice")
    ui.start_proxy()
    client = openai.OpenAI(base_url=ui.base_url, api_key=client_key, max_retries=0, timeout=20)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hi"}])
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": EVIL_MESSAGE}], stream=True
    )
    streamed_text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed_text

    def streamed_flow() -> dict | None:
        response = httpx.get(f"{ui.ui_url}/api/flows", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        return next((f for f in response.json()["flows"] if f["stream"]), None)

    flow = wait_for(streamed_flow, what="the streamed flow to be captured")
    return Captured(streamed_id=flow["id"], streamed_text=streamed_text)


def screenshot(page: Page, name: str, full_page: bool = False) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / name, full_page=full_page)


def assert_nothing_ran(page: Page, events: BrowserEvents) -> None:
    """Captured markup stayed text: no element was made of it, no script of it ran, nothing was blocked."""
    injected = page.evaluate(
        """() => ({
            xss: typeof window.__xss,
            scripts: [...document.scripts].filter(s => s.textContent.includes("__xss")).length,
            handlers: document.querySelectorAll("[onerror]").length,
        })"""
    )
    assert injected == {"xss": "undefined", "scripts": 0, "handlers": 0}
    assert events.dialogs == []
    assert events.csp_violations() == []
    assert events.page_errors == []


def test_logging_in_through_the_form_lands_on_the_flow_list(
    new_page: Callable[..., Page], ui: Keyrotor, browser_events: BrowserEvents
):
    page = new_page(logged_in=False)
    page.goto("/flows")
    expect(page).to_have_url(re.compile(r"/login\?next=%2Fflows$"))
    screenshot(page, "login.png")

    page.get_by_label("Admin key").fill("kra-not-the-admin-key-000000000000")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_have_text("That is not the admin key.")

    page.get_by_label("Admin key").fill(ADMIN_KEY)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(f"{ui.ui_url}/flows")
    expect(page.get_by_role("heading", name="Flows", level=1)).to_be_visible()
    assert browser_events.csp_violations() == []
    assert browser_events.page_errors == []


def test_streamed_flow_is_shown_as_text_and_its_markup_never_runs(
    captured: Captured, page: Page, browser_events: BrowserEvents
):
    page.goto("/flows")
    link = page.locator(f'a[href="/flows/{captured.streamed_id}"]')
    expect(link).to_be_visible()
    assert_nothing_ran(page, browser_events)
    screenshot(page, "flows.png")

    link.click()
    expect(page).to_have_url(re.compile(rf"/flows/{captured.streamed_id}$"))
    expect(page.locator("pre.streamed-text")).to_have_text(captured.streamed_text)
    request = page.locator("section", has=page.get_by_role("heading", name="Request", exact=True))
    request_body = json.loads(request.locator("pre.body").text_content())
    assert request_body["messages"][0]["content"] == EVIL_MESSAGE  # the markup, as the client wrote it
    assert SCRIPT_PAYLOAD in page.locator("main").inner_text()
    assert_nothing_ran(page, browser_events)
    screenshot(page, "flow.png", full_page=True)


def test_flow_pages_fit_a_phone_screen(captured: Captured, new_page: Callable[..., Page]):
    page = new_page(390, 844)
    link = page.locator(f'a[href="/flows/{captured.streamed_id}"]')
    expect(link).to_be_visible()
    for url in ["/flows", f"/flows/{captured.streamed_id}"]:
        page.goto(url)
        scroll_width, inner_width = page.evaluate("() => [document.scrollingElement.scrollWidth, innerWidth]")
        assert scroll_width <= inner_width, f"{url} scrolls sideways on a phone ({scroll_width}px in {inner_width}px)"
