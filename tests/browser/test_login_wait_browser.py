"""The login page after too many wrong admin keys, in a browser: the page with the wait and the form
(never the API's JSON), readable at phone width; the right key still lets the admin in."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from core.login_throttle import LOCK_AFTER
from tests.conftest import ADMIN_KEY, Keyrotor

if TYPE_CHECKING:
    from playwright.sync_api import Page

expect = pytest.importorskip("playwright.sync_api", reason="./test.sh installs playwright").expect
pytestmark = pytest.mark.browser


@pytest.mark.parametrize("width", [390, 1280])
def test_the_login_page_shows_the_wait_and_the_right_key_still_works(
    new_page: Callable[..., Page], ui: Keyrotor, width: int
):
    page = new_page(width=width, logged_in=False)
    page.goto("/login")
    for attempt in range(LOCK_AFTER):
        page.get_by_label("Admin key").fill(f"kra-wrong-guess-{attempt:02d}-0000000000")
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_role("alert")).to_have_text("That is not the admin key.")
    page.get_by_label("Admin key").fill("kra-wrong-guess-again-0000000000")
    page.get_by_role("button", name="Log in").click()
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("Too many wrong admin keys from this address: wait 1")  # 15m0s, or 14m59s
    expect(alert).to_contain_text("UTC) before trying another. The right admin key is not locked out.")
    assert "{" not in page.locator("main").inner_text()  # a page, not an error object
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # nothing sideways
    page.get_by_label("Admin key").fill(ADMIN_KEY)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(f"{ui.ui_url}/dashboard")
