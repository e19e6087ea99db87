"""The monitor UI in a real browser, as an admin uses it, in front of a real proxy.

Flows are made by the official openai client through `run.py proxy` against the fake upstream, so the
pages show what a user would see. Every run takes the README's screenshots into the git-ignored
tests/browser/screenshots/; with KEYROTOR_UPDATE_SCREENSHOTS=1 they replace the tracked ones in docs/screenshots/.
"""

from __future__ import annotations

import json
import os
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

# A plain run must leave the work tree clean: the tracked copies change only when asked.
UPDATE_SCREENSHOTS = os.environ.get("KEYROTOR_UPDATE_SCREENSHOTS", "") == "1"
SCREENSHOTS = ROOT / ("docs" if UPDATE_SCREENSHOTS else "tests/browser") / "screenshots"
PHONE = (390, 844)
KEYS = [
    "sk-good-browser-aaaaaaaaaaaaaaaaaaaa0001",
    "sk-good-browser-bbbbbbbbbbbbbbbbbbbb0002",
    "sk-good-browser-cccccccccccccccccccc0003",
]
SEARCH_WORD = "quokkalantern"  # in no other flow, path or model: only the flows that carry it match
SCRIPT_PAYLOAD = "<script>window.__xss=1</script>"
IMG_PAYLOAD = '<img src=x onerror="window.__xss=2">'
EVIL_MESSAGE = f"Summarise this {SEARCH_WORD} page: {SCRIPT_PAYLOAD} {IMG_PAYLOAD}"
STREAM_CHUNKS = 5  # what the `upstream` fixture sends per streamed reply
LIVE_POLL_DEADLINE_MS = 10_000  # app.js polls the flow list every 3 s
DASHBOARD_REFRESH_DEADLINE_MS = 15_000  # the dashboard refreshes itself every 5 s


def admin_api(ui: Keyrotor, path: str) -> dict:
    response = httpx.get(f"{ui.ui_url}{path}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    response.raise_for_status()
    return response.json()


def openai_client(ui: Keyrotor, client_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=ui.base_url, api_key=client_key, max_retries=0, timeout=20)


def ask(client: openai.OpenAI, content: str) -> None:
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": content}])


def ask_streamed(client: openai.OpenAI, content: str) -> str:
    """The reply's text as the client reassembled it from the stream."""
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": content}], stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text
    return text


@dataclass
class Captured:
    client: openai.OpenAI
    streamed_id: int
    streamed_text: str


@pytest.fixture
def captured(ui: Keyrotor) -> Captured:
    """Keys and a client set up from the CLI, then a plain request and a stream carrying markup, captured."""
    client_key = ui.start_serving(*KEYS[:2])
    client = openai_client(ui, client_key)
    ask(client, "Say hi")
    streamed_text = ask_streamed(client, EVIL_MESSAGE)

    def streamed_flow() -> dict | None:
        return next((f for f in admin_api(ui, "/api/flows")["flows"] if f["stream"]), None)

    flow = wait_for(streamed_flow, what="the streamed flow to be captured")
    return Captured(client=client, streamed_id=flow["id"], streamed_text=streamed_text)


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


def sideways_overflow(page: Page) -> str | None:
    """How far the page scrolls sideways, if it does."""
    scroll_width, inner_width = page.evaluate("() => [document.scrollingElement.scrollWidth, innerWidth]")
    return f"{page.url}: {scroll_width}px wide in {inner_width}px" if scroll_width > inner_width else None


def assert_streamed_flow_shown(page: Page, streamed_text: str, events: BrowserEvents) -> None:
    """The detail page of the stream whose prompt is EVIL_MESSAGE: its text, its events, its markup as text."""
    expect(page.locator("pre.streamed-text")).to_have_text(streamed_text)
    collapsed = page.locator("details.raw-events")  # closed until asked for: the text above is what one reads
    expect(collapsed.locator("table.events")).to_be_hidden()
    collapsed.locator("summary").click()
    raw_events = page.locator("table.events tbody tr")
    expect(raw_events.last.locator("pre")).to_have_text("data: [DONE]")
    offsets = raw_events.locator("td.num").all_inner_texts()
    assert len(offsets) > STREAM_CHUNKS and all(re.fullmatch(r"\+\d+\.\d ms", o) for o in offsets), offsets
    arrivals = [float(o[1:-3]) for o in offsets]
    assert arrivals == sorted(arrivals), offsets
    request = page.locator("section", has=page.get_by_role("heading", name="Request", exact=True))
    request_body = json.loads(request.locator("pre.body").text_content())
    assert request_body["messages"][0]["content"] == EVIL_MESSAGE  # the markup, as the client wrote it
    assert json.dumps(EVIL_MESSAGE, ensure_ascii=False) in page.locator("main").inner_text()  # shown as text
    assert_nothing_ran(page, events)


def test_an_admin_finds_a_streamed_flow_by_search_and_its_markup_never_runs(
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

    page.get_by_role("link", name="Upstream keys").click()
    page.get_by_label("One key per line").fill("\n".join([KEYS[0], KEYS[1], "not a key", KEYS[0]]))
    page.get_by_role("button", name="Add keys", exact=True).click()
    expect(page.get_by_role("status")).to_have_text("Added 2, skipped 1 duplicate(s), rejected 1 malformed (line 3).")
    page.reload()  # after a redirect: a GET, so nothing is posted again
    expect(page.get_by_role("status")).to_have_text("Added 2, skipped 1 duplicate(s), rejected 1 malformed (line 3).")
    assert len(admin_api(ui, "/api/keys")["keys"]) == 2
    assert browser_events.dialogs == []  # no "confirm form resubmission"
    key_rows = page.locator("table.keys tbody tr")
    expect(key_rows.locator("code")).to_have_text(["…0001", "…0002"])
    expect(key_rows.locator(".badge")).to_have_text(["active", "active"])
    assert not [key for key in KEYS if key in page.content()], "a key's value reached the page"
    screenshot(page, "keys.png")

    page.get_by_role("link", name="Clients").click()
    page.get_by_label("Client name").fill("alice")
    page.get_by_role("button", name="Create client", exact=True).click()
    client_key = page.locator("#new-client-key").inner_text().strip()
    expect(page.locator("table.clients tbody tr")).to_contain_text(["alice"])
    expect(page.locator("table.clients tbody code")).to_have_text([f"…{client_key[-4:]}"])
    screenshot(page, "clients.png")

    ui.start_proxy()
    client = openai_client(ui, client_key)
    ask(client, "Say hi")
    ask(client, f"Spell {SEARCH_WORD} backwards")
    streamed_text = ask_streamed(client, EVIL_MESSAGE)

    def streamed_flow_found_by_search() -> dict | None:
        found = admin_api(ui, f"/api/flows?q={SEARCH_WORD}")["flows"]
        return next((f for f in found if f["stream"]), None) if len(found) == 2 else None

    streamed_id = wait_for(streamed_flow_found_by_search, what="both flows with the search word captured")["id"]

    page.get_by_role("link", name="Flows", exact=True).click()
    search = page.get_by_label("Full-text search")
    search.fill(SEARCH_WORD)
    with page.expect_navigation() as searched:
        search.press("Enter")
    assert searched.value.ok, f"the filter form was refused: {searched.value.status} {searched.value.text()}"
    expect(page).to_have_url(re.compile(rf"/flows\?q={SEARCH_WORD}&"))
    expect(search).to_have_value(SEARCH_WORD)
    expect(page.locator("table.flows tbody tr")).to_have_count(2)  # not "Say hi"

    page.locator(f'a[href="/flows/{streamed_id}"]').click()
    expect(page).to_have_url(re.compile(rf"/flows/{streamed_id}$"))
    assert_streamed_flow_shown(page, streamed_text, browser_events)


def test_a_streamed_flow_found_by_a_search_link_shows_its_text_and_events_and_runs_no_markup(
    captured: Captured, page: Page, browser_events: BrowserEvents
):
    # The search box itself is driven by the journey above; a shared ?q= link must lead to the same flow.
    page.goto(f"/flows?q={SEARCH_WORD}")
    expect(page.get_by_label("Full-text search")).to_have_value(SEARCH_WORD)
    rows = page.locator("table.flows tbody tr")
    expect(rows).to_have_count(1)  # not "Say hi"
    assert_nothing_ran(page, browser_events)
    screenshot(page, "flows.png")

    rows.locator("td.c-time a").click()
    expect(page).to_have_url(re.compile(rf"/flows/{captured.streamed_id}$"))
    assert_streamed_flow_shown(page, captured.streamed_text, browser_events)
    screenshot(page, "flow.png", full_page=True)


def test_new_flows_appear_on_the_open_flow_list_without_a_reload(ui: Keyrotor, new_page: Callable[..., Page]):
    client_key = ui.start_serving(*KEYS[:2])
    client = openai_client(ui, client_key)
    page = new_page()
    expect(page.locator("#flows-empty")).to_be_visible()
    page.evaluate("() => { window.__sameDocument = true }")
    rows = page.locator("table.flows tbody tr")

    ask(client, "The first request")
    expect(rows).to_have_count(1, timeout=LIVE_POLL_DEADLINE_MS)
    expect(page.locator("#flows-empty")).to_have_count(0)
    ask(client, "The second request")
    expect(rows).to_have_count(2, timeout=LIVE_POLL_DEADLINE_MS)

    newest = max(f["id"] for f in admin_api(ui, "/api/flows")["flows"])
    expect(rows.first.locator("td.c-time a")).to_have_attribute("href", f"/flows/{newest}")
    expect(rows.first.locator("td.c-client a")).to_have_text("alice")  # names, as the server renders them
    expect(rows.first.locator("td.c-key a")).to_have_text(re.compile(r"^#\d \(…000\d\)$"))
    expect(rows.first).to_have_class(re.compile(r"\bfresh\b"))
    expect(page.locator("#live-status")).to_have_text("live")
    assert page.evaluate("() => window.__sameDocument") is True, "the page was reloaded"


def test_dashboard_counts_requests_draws_charts_and_refreshes_itself(
    captured: Captured, ui: Keyrotor, new_page: Callable[..., Page], browser_events: BrowserEvents
):
    wait_for(
        lambda: admin_api(ui, "/api/dashboard")["windows"][-1]["requests"] == 2, what="both requests in the rollups"
    )
    page = new_page()
    page.goto("/dashboard?range=1h")  # minute charts (the default range, 24 hours, draws hours)

    def requests_in(window: str):
        card = page.locator("section.card", has=page.get_by_role("heading", name=window, exact=True))
        return card.locator('dt:text-is("Requests") + dd')

    expect(requests_in("last hour")).to_have_text("2")
    expect(requests_in("all time")).to_have_text("2")
    charts = page.locator("figure.chart")
    expect(charts).to_have_count(4)
    for chart in charts.all():
        expect(chart.locator("text.axis-title")).to_have_text(
            [re.compile(r"^(requests|latency|tokens|USD)$"), "time (UTC)"]
        )
        expect(chart.locator("svg.y-axis text.tick").first).to_have_text(re.compile(r"^(0( ms)?|\$0\.00)$"))
    minute = page.locator("#chart-minute")
    expect(minute.locator("rect.bar.ok").first).to_be_visible()  # a bar only for a minute with requests
    busy = minute.locator("rect.hit:not([data-tip$='no requests'])").last  # the newest minute with requests
    bucket = busy.get_attribute("data-bucket")
    busy.hover()
    tip = page.locator("#chart-tip")
    expect(tip).to_be_visible()
    expect(tip).to_have_text(re.compile(r"^\d\d:\d\d UTC: [12] requests?, 0 errors$"))
    page.locator("#chart-latency rect.hit[data-tip*='p50']").last.hover()
    expect(tip).to_have_text(re.compile(r"UTC: p50 [\d.]+ m?s, p95 [\d.]+ m?s \(\d+ requests?\)$"))
    screenshot(page, "dashboard.png")

    busy.hover()
    newest = minute.locator("rect.hit").last.get_attribute("data-bucket")
    ask(captured.client, "One more")
    expect(requests_in("all time")).to_have_text("3", timeout=DASHBOARD_REFRESH_DEADLINE_MS)
    # The refresh replaced the chart hovered; the tip follows the same minute, with its figures from the refresh.
    # (Unless a minute began meanwhile: then every bar moved one place left, and the tip shows the one now under
    # the pointer, which the browser points at.)
    shifted = minute.locator("rect.hit").last.get_attribute("data-bucket") != newest
    refreshed = minute.locator("rect.hit.active") if shifted else minute.locator(f"rect.hit[data-bucket='{bucket}']")
    expect(refreshed).to_have_class(re.compile(r"\bactive\b"))
    expect(minute.locator("rect.hit.active")).to_have_count(1)
    expect(tip).to_have_text(refreshed.get_attribute("data-tip"))
    expect(requests_in("last hour")).to_have_text("3")
    assert browser_events.csp_violations() == []
    assert browser_events.page_errors == []


def test_keys_are_disabled_enabled_and_deleted_only_after_a_yes(
    ui: Keyrotor, new_page: Callable[..., Page], browser_events: BrowserEvents
):
    ui.add_keys(*KEYS)
    page = new_page()
    page.goto("/keys")
    rows = page.locator("table.keys tbody tr")
    first, third = rows.filter(has_text="…0001"), rows.filter(has_text="…0003")
    expect(rows).to_have_count(3)

    first.get_by_role("button", name="Disable").click()
    expect(page.get_by_role("status")).to_have_text("1 key(s) disabled.")
    expect(first.locator(".badge")).to_have_text("disabled")
    first.get_by_role("button", name="Enable").click()
    expect(page.get_by_role("status")).to_have_text("1 key(s) enabled.")
    expect(first.locator(".badge")).to_have_text("active")

    with page.expect_event("dialog"):
        third.get_by_role("button", name="Delete").click()  # and the user answers Cancel
    page.goto("/keys")
    expect(rows).to_have_count(3)
    expect(third).to_be_visible()

    browser_events.accept_dialogs = True
    with page.expect_event("dialog"):
        third.get_by_role("button", name="Delete").click()
    expect(page.get_by_role("status")).to_have_text("1 key(s) deleted.")
    expect(third).to_have_count(0)
    expect(rows).to_have_count(2)
    assert browser_events.dialogs == ["confirm: Delete key #3 (…0003)? This cannot be undone."] * 2
    assert [k["key"] for k in admin_api(ui, "/api/keys")["keys"]] == ["…0001", "…0002"]


def test_every_page_fits_a_phone_screen(captured: Captured, new_page: Callable[..., Page]):
    page = new_page(*PHONE)
    expect(page.locator(f'a[href="/flows/{captured.streamed_id}"]')).to_be_visible()
    screenshot(page, "phone-flows.png")
    overflowing = []
    for url in [
        "/flows",
        "/dashboard",
        "/keys",
        "/upstreams",
        "/groups/1",
        "/models",
        "/clients",
        f"/flows/{captured.streamed_id}",
    ]:
        page.goto(url)
        expect(page.locator("h1")).to_be_visible()
        overflowing.append(sideways_overflow(page))
    logged_out = new_page(*PHONE, logged_in=False)
    logged_out.goto("/login")
    overflowing.append(sideways_overflow(logged_out))
    assert [o for o in overflowing if o] == [], "pages that scroll sideways on a phone"


def test_a_key_renamed_on_the_keys_page_is_named_on_the_dashboard_and_in_the_flow_detail(
    captured: Captured, ui: Keyrotor, new_page: Callable[..., Page], browser_events: BrowserEvents
):
    key_id = admin_api(ui, f"/api/flows/{captured.streamed_id}")["upstream_key_id"]
    last4 = KEYS[key_id - 1][-4:]
    page = new_page()
    page.goto("/keys")
    row = page.locator(f"#key-{key_id}")
    row.get_by_label(f"Name of key #{key_id}").fill("Key <b>1</b>")
    row.get_by_role("button", name="Save").click()
    expect(page.get_by_role("status")).to_have_text("1 key(s) saved.")
    expect(page.get_by_label(f"Name of key #{key_id}")).to_have_value("Key <b>1</b>")

    label = f"Key <b>1</b> (…{last4})"
    page.goto("/dashboard")
    by_key = page.locator("section.card", has=page.get_by_role("heading", name="By upstream key"))
    expect(by_key.get_by_role("link", name=label, exact=True)).to_have_attribute("href", f"/keys/{key_id}")
    page.goto(f"/flows/{captured.streamed_id}")
    expect(page.locator('dt:text-is("Upstream key") + dd a')).to_have_text(label)
    page.goto("/flows")
    page.get_by_role("link", name=label).first.click()  # filters the list by that key
    expect(page).to_have_url(re.compile(rf"/flows\?key={key_id}$"))
    expect(page.locator("table.flows tbody tr")).to_have_count(1)
    assert page.locator("b").count() == 0  # the name is text, not markup
    assert_nothing_ran(page, browser_events)


def test_on_a_phone_flows_are_cards_and_charts_answer_a_tap_in_legible_text(
    captured: Captured, new_page: Callable[..., Page], browser_events: BrowserEvents
):
    page = new_page(*PHONE, touch=True)
    card = page.locator("table.flows tbody tr").first
    expect(card).to_be_visible()
    assert card.evaluate("e => getComputedStyle(e).display") == "flex"
    assert page.locator("table.flows thead").evaluate("e => e.getBoundingClientRect().height") <= 1
    for cell in ("td.c-status", "td.c-model", "td.c-time", "td.c-tokens", "td.c-cost", "td.c-client", "td.c-key"):
        expect(card.locator(cell)).to_be_visible()
    status = card.locator(".status")
    assert status.evaluate("e => e.getClientRects().length") == 1, "a status code broke across lines"
    assert sideways_overflow(page) is None

    page.goto("/dashboard")
    hit = page.locator("#chart-hour rect.hit:not([data-tip$='no requests'])").last
    hit.tap()
    expect(page.locator("#chart-tip")).to_have_text(re.compile(r"UTC: [12] requests?, 0 errors$"))
    ticks = page.locator("figure.chart text.tick")
    sizes = ticks.evaluate_all("ts => ts.map(t => [parseFloat(getComputedStyle(t).fontSize), t.getScreenCTM().a])")
    assert sizes and all(size >= 11 and scale == 1 for size, scale in sizes), sizes  # not shrunk with the chart
    expect(page.locator("table.breakdown")).to_have_count(5)  # by model, upstream, group, upstream key and client
    costs = page.locator("table.breakdown td.c-cost")
    assert costs.count() >= 5
    for cost in costs.all():  # each row a card: its cost in view, labelled, whole
        expect(cost).to_be_visible()
        expect(cost).to_have_text(re.compile(r"^\$\d[\d,]*\.\d{4}$"))
        assert cost.evaluate("e => e.getBoundingClientRect().right") <= PHONE[0]
        assert cost.evaluate("e => getComputedStyle(e, '::before').content") == '"cost "'
    assert sideways_overflow(page) is None
    screenshot(page, "phone-dashboard.png")
    assert browser_events.csp_violations() == [] and browser_events.page_errors == []


def test_an_upstream_and_a_group_added_on_the_pages_get_keys_and_models_on_the_group_page(
    ui: Keyrotor, new_page: Callable[..., Page], browser_events: BrowserEvents
):
    page = new_page()
    page.get_by_role("link", name="Upstreams").click()
    adding = page.locator("details", has=page.locator("summary", has_text="Add an upstream"))
    adding.locator("summary").click()
    adding.get_by_label("Name").fill("relay")
    adding.get_by_label("Base URL").fill(ui.upstream_url)  # the fake upstream stands in for a relay station
    adding.get_by_role("button", name="Add upstream").click()
    expect(page.get_by_role("status")).to_have_text("Upstream added: give it a group below.")
    relay = page.locator("section.upstream", has=page.get_by_role("heading", name=re.compile(r"^relay\b")))
    expect(relay.locator(".url code")).to_have_text(ui.upstream_url)

    relay.get_by_label("Name of a new group of relay").fill("cheap")
    relay.get_by_label("Priority").fill("10")
    relay.get_by_role("button", name="Add group").click()
    expect(page).to_have_url(re.compile(r"/groups/\d+\?done=group-added$"))
    expect(page.locator("h1")).to_contain_text("relay/cheap")
    expect(page.locator('dt:text-is("Priority") + dd')).to_contain_text("10")
    expect(page.locator("#models .empty")).to_have_text("No models listed: this group serves every model.")

    page.get_by_label("One key per line", exact=False).fill(KEYS[1])
    page.get_by_role("button", name="Add keys").click()
    expect(page.get_by_role("status")).to_have_text("Added 1, skipped 0 duplicate(s), rejected 0 malformed.")
    expect(page.locator("table.keys tbody tr")).to_have_count(1)
    expect(page.locator("table.keys tbody tr td.c-key")).to_have_text("…0002")

    page.get_by_role("button", name="Refresh from upstream").click()  # GET /v1/models with that key
    expect(page.get_by_role("status")).to_contain_text("Upstream listed")
    expect(page.locator("table.models tbody tr").first).to_contain_text("gpt-")
    group_id = int(re.search(r"/groups/(\d+)", page.url).group(1))
    assert [k["key"] for k in admin_api(ui, f"/api/groups/{group_id}")["key_list"]] == ["…0002"]

    page.goto("/upstreams")
    expect(relay.get_by_role("link", name="relay/cheap")).to_have_attribute("href", f"/groups/{group_id}")
    with page.expect_event("dialog"):
        relay.get_by_role("button", name="Delete").click()  # and the user answers Cancel
    assert browser_events.dialogs == [
        "confirm: Delete upstream relay with its 1 group(s) and 1 key(s)? This cannot be undone."
    ]
    assert "relay" in [u["name"] for u in admin_api(ui, "/api/upstreams")["upstreams"]]

    phone = new_page(*PHONE)
    for url in ("/upstreams", f"/groups/{group_id}", "/models"):
        phone.goto(url)
        expect(phone.locator("h1")).to_be_visible()
        assert sideways_overflow(phone) is None
    screenshot(phone, "phone-models.png", full_page=True)
    phone.goto(f"/groups/{group_id}")
    screenshot(phone, "phone-group.png", full_page=True)
    screenshot(page, "upstreams.png", full_page=True)
    assert browser_events.csp_violations() == [] and browser_events.page_errors == []
