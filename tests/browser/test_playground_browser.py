"""The chat playground in a real browser (docs/playground.md): a streamed answer grows on the page as the
proxy passes it on, links to its flow, and stays text; a client over its budget gets its refusal shown."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.browser.test_ui_browser import PHONE, assert_nothing_ran, screenshot, sideways_overflow
from tests.conftest import ADMIN_KEY, Keyrotor, wait_for
from tests.fake_upstream import FakeUpstream

if TYPE_CHECKING:
    from playwright.sync_api import Page

    from tests.browser.conftest import BrowserEvents

expect = pytest.importorskip("playwright.sync_api", reason="./test.sh installs playwright").expect
pytestmark = pytest.mark.browser

KEYS = ("sk-good-playground-aaaaaaaaaaaaaaaaaa01",)
MODEL = "gpt-4o-mini"
PIECES = 12  # the answer arrives in this many chunks ...
PIECE_DELAY = 0.25  # ... this far apart: a few seconds in all, polled many times on the way
PROMPT = '<script>window.__xss=1</script> <img src=x onerror="window.__xss=2"> tell me more'


@pytest.fixture
def ui(keyrotor: Keyrotor, upstream: FakeUpstream) -> Keyrotor:
    """This module's installation: a key, client alice, the proxy, and the UI pointed at the proxy's port."""
    upstream.stream_chunks, upstream.stream_delay = PIECES, PIECE_DELAY
    keyrotor.add_keys(*KEYS)
    keyrotor.add_client("alice")
    keyrotor.start_proxy()
    keyrotor.start_ui("--proxy-port", str(keyrotor.proxy_port))
    return keyrotor


def send(page: Page, prompt: str, model: str = MODEL) -> None:
    page.locator("#pg-form input[name=model]").fill(model)
    page.locator("#pg-form textarea[name=prompt]").fill(prompt)
    page.locator("#pg-send").click()


def test_a_streamed_answer_arrives_in_pieces_links_its_flow_and_stays_text(
    ui: Keyrotor, new_page: Callable[..., Page], browser_events: BrowserEvents
):
    page = new_page()
    page.goto("/playground")
    expect(page.get_by_role("link", name="Playground")).to_have_attribute("aria-current", "page")
    send(page, PROMPT)
    answer = page.locator(".pg-turn").last.locator(".pg-answer")
    seen: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = answer.text_content() or ""
        if not seen or text != seen[-1]:
            seen.append(text)
        if page.locator(".pg-turn").last.locator(".pg-flow").count():
            break
        page.wait_for_timeout(40)
    final = answer.text_content() or ""
    assert final.startswith("Hello from the fake upstream.") and len(final.split()) >= PIECES
    growing = [t for t in seen if t]
    assert len(growing) >= 4, f"the answer should grow on the page as it streams: {seen}"
    assert all(final.startswith(t) for t in growing), seen  # each state a prefix of the next: pieces appended
    # The turn names its flow once stored, with the facts the flow recorded.
    meta = page.locator(".pg-turn").last.locator(".pg-meta")
    expect(meta.locator(".pg-flow")).to_be_visible()
    expect(meta.locator(".pg-tokens")).to_contain_text("out tokens")
    expect(meta.locator(".pg-first-byte")).to_contain_text("first byte")
    expect(meta.locator(".pg-total")).to_contain_text("total")
    # The prompt's markup is text, on the page as typed; nothing of it ran.
    expect(page.locator(".pg-turn").last.locator(".pg-user .pg-text")).to_have_text(PROMPT)
    assert_nothing_ran(page, browser_events)
    expect(page).to_have_url(re.compile(r"/playground\?conversation=pg-[0-9a-f]{16}$"))
    conversation_id = page.url.rpartition("=")[2]
    # Reopened: the turn is there, rendered by the server, still text; the history lists it by its first words.
    page.reload()
    expect(page.locator(".pg-turn .pg-answer")).to_have_text(final)
    expect(page.locator(".pg-turn .pg-user .pg-text")).to_have_text(PROMPT)
    expect(page.locator(".pg-list li[aria-current] a").first).to_have_text(re.compile(r"^<script>window"))
    assert_nothing_ran(page, browser_events)
    # Going on sends the first turn again, and the second answer streams into a second turn.
    send(page, "and then?")
    expect(page.locator(".pg-turn")).to_have_count(2)
    expect(page.locator(".pg-turn").last.locator(".pg-flow")).to_be_visible(timeout=30_000)
    assert page.url.endswith(conversation_id)
    screenshot(page, "playground.png")
    # The flow link opens the flow: the playground client's request, carrying the whole conversation.
    page.locator(".pg-turn").last.locator(".pg-flow").click()
    expect(page).to_have_url(re.compile(r"/flows/\d+$"))
    flow = httpx.get(
        f"{ui.ui_url}/api{page.url.partition(ui.ui_url)[2]}", headers={"authorization": f"Bearer {ADMIN_KEY}"}
    ).json()
    sent = json.loads(flow["request_body"])["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"] and sent[0]["content"] == PROMPT
    assert sent[1]["content"] == final
    playground = ui.query("SELECT id FROM clients WHERE name = 'playground'")[0]["id"]
    assert ui.query("SELECT client_id FROM flows WHERE id = ?", (flow["id"],))[0]["client_id"] == playground
    assert_nothing_ran(page, browser_events)


def test_on_a_phone_a_client_over_its_budget_gets_its_refusal_shown_and_a_conversation_is_deleted(
    ui: Keyrotor, new_page: Callable[..., Page], browser_events: BrowserEvents, upstream: FakeUpstream
):
    ui.setup("clients", "set", "alice", "--daily-tokens", "30")
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}

    def spent() -> bool:  # alice's budget used up through the API, as the page would
        answer = httpx.post(
            f"{ui.ui_url}/api/playground/chat",
            json={"model": MODEL, "prompt": "spend " * 10, "client": "alice", "stream": False},
            headers=admin,
            timeout=30,
        )
        return answer.status_code == 429

    wait_for(spent, timeout=30, what="alice over her budget")
    before = len(upstream.received)
    page = new_page(*PHONE, touch=True)
    page.goto("/playground")
    page.locator("#pg-form select[name=client]").select_option("alice")
    send(page, "one more, please")
    error = page.locator(".pg-turn").last.locator(".pg-error")
    expect(error).to_contain_text("budget")
    expect(page.locator(".pg-turn").last.locator(".pg-meta .status")).to_have_text("429", timeout=20_000)
    assert len(upstream.received) == before  # refused by the proxy, never sent upstream
    screenshot(page, "phone-playground.png", full_page=True)
    assert sideways_overflow(page) is None
    assert page.locator("#pg-send").is_enabled()
    # The page's history: delete a conversation after a yes; it leaves the list, its flows stay.
    flows_before = len(httpx.get(f"{ui.ui_url}/api/flows", headers=admin).json()["flows"])
    page.goto("/playground")
    count = page.locator(".pg-list li").count()
    assert count >= 2
    browser_events.accept_dialogs = True
    page.locator(".pg-list li").first.get_by_role("button", name=re.compile("^Delete")).click()
    expect(page.locator(".pg-list li")).to_have_count(count - 1)
    assert browser_events.dialogs == ["confirm: Delete this conversation? Its flows stay in the flow list."]
    browser_events.dialogs.clear()
    assert len(httpx.get(f"{ui.ui_url}/api/flows", headers=admin).json()["flows"]) == flows_before
    assert sideways_overflow(page) is None
    assert_nothing_ran(page, browser_events)
