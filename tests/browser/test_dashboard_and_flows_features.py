"""Issue 24 §2 in a real browser: the time-range picker redraws the charts; previews and tags in the flows list
are text (captured markup never runs), on the page as rendered and on rows that arrive live."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import openai
import pytest

from tests.browser.test_ui_browser import admin_api, assert_nothing_ran, openai_client, screenshot
from tests.conftest import Keyrotor, wait_for

if TYPE_CHECKING:
    from playwright.sync_api import Page

    from tests.browser.conftest import BrowserEvents

expect = pytest.importorskip("playwright.sync_api", reason="./test.sh installs playwright").expect

KEYS = ["sk-good-range-aaaaaaaaaaaaaaaaaaaaa0001", "sk-good-range-bbbbbbbbbbbbbbbbbbbbb0002"]
PROMPT = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2"> what is 2+2?'


def ask(client: openai.OpenAI, content: str, **headers: str) -> None:
    client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": content}], extra_headers=headers or None
    )


def test_the_time_range_picker_changes_the_charts_and_breakdowns(
    ui: Keyrotor, new_page: Callable[..., Page], browser_events: BrowserEvents
):
    client = openai_client(ui, ui.start_serving(*KEYS))
    ask(client, "one")
    wait_for(lambda: admin_api(ui, "/api/dashboard")["windows"][-1]["requests"] == 1, what="the request rolled up")
    page = new_page()
    page.goto("/dashboard")
    requests_chart = page.locator("figure.chart").first
    expect(requests_chart.locator(".chart-title")).to_have_text("Requests per hour, last 24 hours")
    expect(requests_chart.locator("rect.hit")).to_have_count(24)
    expect(page.locator("#breakdowns")).to_have_text("Last 24 hours by model, upstream, group, key and client")

    for label, title, slots, tick in (
        ("last hour", "Requests per minute, last hour", 60, r"^\d\d:\d\d$"),
        ("last 7 days", "Requests per hour, last 7 days", 168, r"^\d\d \w\w\w$"),
        ("last 30 days", "Requests per day, last 30 days", 30, r"^\d\d \w\w\w$"),
    ):
        page.locator("#range-picker").get_by_role("link", name=label, exact=True).click()
        expect(requests_chart.locator(".chart-title")).to_have_text(title)
        expect(requests_chart.locator("rect.hit")).to_have_count(slots)
        expect(requests_chart.locator("svg.plot text.tick").first).to_have_text(re.compile(tick))
        expect(page.locator("#range-picker a.current")).to_have_text(label)
        expect(requests_chart.locator("rect.hit:not([data-tip$='no requests'])")).to_have_count(1)  # the request
        expect(page.locator("#breakdowns")).to_have_text(
            f"{label.capitalize()} by model, upstream, group, key and client"
        )
        expect(page.locator("[data-refresh]")).to_have_attribute("data-refresh", re.compile(r"range="))
    screenshot(page, "dashboard-30-days.png")

    # A custom range that ended a day ago: the request is outside it.
    page.locator("#range-picker input[name=since]").fill("2026-01-01T00:00")
    page.locator("#range-picker input[name=until]").fill(
        page.evaluate("() => new Date(Date.now() - 86400000).toISOString().slice(0, 16)")
    )
    page.locator("#range-picker").get_by_role("button", name="Show").click()
    expect(requests_chart.locator(".chart-title")).to_have_text(re.compile(r"^Requests per day, custom range$"))
    expect(requests_chart.locator("rect.hit:not([data-tip$='no requests'])")).to_have_count(0)
    expect(page.locator("table.breakdown")).to_have_count(0)
    expect(page.locator("figure#chart-spend")).to_be_visible()  # spend per day stays the last 30 days
    assert browser_events.csp_violations() == [] and browser_events.page_errors == []


def test_previews_and_tags_in_the_flows_list_are_text_rendered_and_live(
    ui: Keyrotor, new_page: Callable[..., Page], browser_events: BrowserEvents
):
    client = openai_client(ui, ui.start_serving(*KEYS))
    ask(client, PROMPT, **{"x-keyrotor-tags": "eval,nightly", "x-keyrotor-session": "conv-7"})
    wait_for(lambda: admin_api(ui, "/api/flows")["flows"], what="the first flow")
    page = new_page()
    page.goto("/flows")
    rows = page.locator("table.flows tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first.locator(".preview .prompt")).to_have_text(PROMPT)  # the markup, as text
    expect(rows.first.locator(".preview .answer")).to_have_text(re.compile(r"^Hello from the fake upstream"))
    expect(rows.first.locator(".labels a.tag")).to_have_text(["eval", "nightly"])

    ask(client, PROMPT + " (live)", **{"x-keyrotor-tags": "live"})  # built by app.js
    expect(rows).to_have_count(2, timeout=10_000)
    expect(rows.first.locator(".preview .prompt")).to_have_text(PROMPT + " (live)")
    expect(rows.first.locator(".labels a.tag")).to_have_text(["live"])
    screenshot(page, "flows-previews.png")
    assert_nothing_ran(page, browser_events)

    rows.last.locator(".labels a.session").click()
    expect(page).to_have_url(re.compile(r"session=conv-7"))
    expect(rows).to_have_count(1)
    page.locator("input[name=tag]").fill("live")
    page.locator("input[name=session]").fill("")
    page.get_by_role("button", name="Filter").click()
    expect(rows).to_have_count(1)
    expect(rows.first.locator(".labels a.tag")).to_have_text(["live"])
    page.select_option("#flows-range", "1h")
    page.get_by_role("button", name="Filter").click()
    expect(page).to_have_url(re.compile(r"range=1h"))
    expect(rows).to_have_count(1)
    assert_nothing_ran(page, browser_events)
