"""Every page at 390, 1280 and 1440 px with realistic names and figures: nothing wider than the window, no
dashboard cell narrower than its longest word; an Azure retry's page shows what the client sent, each
attempt where it went, and a "copy as curl" that replays to 200; the login page shows the wait.

The installation: an Azure resource whose first group refuses its key (every gpt-4o request is retried on
the second group), a streamed request, clients and keys with long names, and a day of seeded traffic with
long model names and large costs, as a busy gateway's dashboard shows them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import openai
import pytest

from core.records import FlowRecord
from storage import db, flows, outcomes, rollups
from tests.conftest import ADMIN_KEY, ROOT, Keyrotor, wait_for
from tests.fake_upstream import FakeAzure

if TYPE_CHECKING:
    from playwright.sync_api import Page

    from tests.browser.conftest import BrowserEvents

expect = pytest.importorskip("playwright.sync_api", reason="./test.sh installs playwright").expect
pytestmark = pytest.mark.browser

UPDATE_SCREENSHOTS = os.environ.get("KEYROTOR_UPDATE_SCREENSHOTS", "") == "1"
SCREENSHOTS = ROOT / ("docs" if UPDATE_SCREENSHOTS else "tests/browser") / "screenshots"
WIDTHS = [(390, 844), (1280, 800), (1440, 900)]
BAD_AZURE = "0123456789abcdef0123456789abcd01"
GOOD_AZURE = "0123456789abcdef0123456789abcd02"
DEFAULT_KEYS = ["sk-good-fit-aaaaaaaaaaaaaaaaaaaaaaaa0003", "sk-good-fit-bbbbbbbbbbbbbbbbbbbbbbbb0004"]
LONG_CLIENT = "research-assistants-europe-west-staging"
LONG_MODELS = ["gpt-4o-mini-2024-07-18", "text-embedding-3-large", "gpt-4o-2024-11-20-realtime-preview"]
CLIENT_PATH = "/v1/chat/completions"


@dataclass
class Installation:
    kr: Keyrotor
    client_key: str
    retried_id: int  # the Azure retry's row
    streamed_id: int


def admin_api(kr: Keyrotor, path: str) -> dict:
    response = httpx.get(f"{kr.ui_url}{path}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    response.raise_for_status()
    return response.json()


def seed_a_busy_day(kr: Keyrotor) -> None:
    """Flows as the capture writer stores them: long model names, every key and client, costs in thousands."""
    now = time.time()
    records = []
    for n in range(40):
        model = LONG_MODELS[n % len(LONG_MODELS)]
        records.append(
            FlowRecord(
                flow_id=f"seeded-{n}",
                started_at=now - 3600 * (n % 20) - 60,
                ended_at=now - 3600 * (n % 20) - 59,
                duration_ms=850.0 + n,
                method="POST",
                path=CLIENT_PATH,
                status=200 if n % 7 else 429,
                model=model,
                client_key_id=1 + n % 2,
                client_id=1 + n % 2,
                upstream_key_id=3 + n % 2,  # the default group's keys
                upstream_id=1,
                group_id=1,
                attempts=1,
                prompt_tokens=1_234_567,
                completion_tokens=98_765,
                total_tokens=1_333_332,
                cost=1234.5678 / 40,
                request_headers=[["content-type", "application/json"]],
                request_body=json.dumps({"model": model, "messages": []}),
            )
        )
    conn = db.connect(kr.db_path)
    try:
        with conn:
            flows.insert_batch(conn, records)
            rollups.add_records(conn, records)
            outcomes.add_records(conn, records)
    finally:
        conn.close()


@pytest.fixture
def azure() -> Iterator[FakeAzure]:
    with FakeAzure({"prod-gpt4o": "gpt-4o-2024-08-06", "backup-gpt4o": "gpt-4o-2024-08-06"}).start() as up:
        up.set_key(BAD_AZURE, "invalid")
        up.set_key(GOOD_AZURE, "ok")
        yield up


@pytest.fixture
def client_key(keyrotor: Keyrotor) -> str:
    """The key of the client with the long name, which the proxy knows from its start."""
    key = keyrotor.add_client(LONG_CLIENT)
    keyrotor.add_client("support-bot")
    return key


@pytest.fixture
def ui(keyrotor: Keyrotor, azure: FakeAzure, client_key: str) -> Keyrotor:
    """Overrides conftest's: the proxy starts first, so that the UI's "copy as curl" points at it."""
    kr = keyrotor
    kr.setup("upstreams", "add", "azure-sweden-central", azure.url, "--dialect", "azure")
    kr.setup("groups", "add", "azure-sweden-central/production-primary", "--priority", "10")
    kr.setup("groups", "add", "azure-sweden-central/production-backup", "--priority", "5")
    kr.setup("groups", "add", "azure-sweden-central/no-keys-yet", "--priority", "1")
    kr.setup("models", "add", "azure-sweden-central/production-primary", "gpt-4o", "--as", "prod-gpt4o")
    kr.setup("models", "add", "azure-sweden-central/production-backup", "gpt-4o", "--as", "backup-gpt4o")
    kr.setup("models", "add", "azure-sweden-central/no-keys-yet", "o1-preview-2024-09-12")
    kr.setup("keys", "add", "--group", "azure-sweden-central/production-primary", input=BAD_AZURE + "\n")
    kr.setup("keys", "add", "--group", "azure-sweden-central/production-backup", input=GOOD_AZURE + "\n")
    kr.add_keys(*DEFAULT_KEYS)
    kr.setup("keys", "rename", "3", "openai-production-organisation-main")
    kr.setup("keys", "rename", "4", "openai-batch-jobs-overflow")
    kr.start_proxy()
    kr.start_ui("--proxy-port", str(kr.proxy_port))
    return kr


@pytest.fixture
def installation(ui: Keyrotor, client_key: str) -> Installation:
    client = openai.OpenAI(base_url=ui.base_url, api_key=client_key, max_retries=0, timeout=20)
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Retried on Azure"}])
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Stream to me"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    def both() -> list[dict] | None:
        listed = admin_api(ui, "/api/flows")["flows"]
        return listed if len(listed) == 2 else None

    listed = wait_for(both, what="both flows captured")
    seed_a_busy_day(ui)
    retried = next(f for f in listed if not f["stream"])
    streamed = next(f for f in listed if f["stream"])
    return Installation(ui, client_key, retried["id"], streamed["id"])


def screenshot(page: Page, name: str, full_page: bool = False) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / name, full_page=full_page)


# Elements reaching past the window's edges that no box of theirs scrolls or clips (a table too wide for
# its box scrolls inside it: that is allowed, and hinted).
STICKING_OUT = """() => {
  const width = document.documentElement.clientWidth;
  const clipped = (e) => {
    for (let a = e.parentElement; a && a !== document.body; a = a.parentElement) {
      const o = getComputedStyle(a).overflowX;
      if (o === "auto" || o === "scroll" || o === "hidden" || o === "clip") return true;
    }
    return false;
  };
  const out = [];
  for (const e of document.body.querySelectorAll("*")) {
    const r = e.getBoundingClientRect();
    if (r.width === 0 || r.height === 0) continue;
    if ((r.right > width + 1 || r.left < -1) && !clipped(e)) {
      out.push(e.tagName.toLowerCase() + (e.className ? "." + String(e.className).replace(/ /g, ".") : "")
               + " " + Math.round(r.left) + ".." + Math.round(r.right));
    }
  }
  return out.slice(0, 10);
}"""

# Table cells narrower than the longest word they hold (a word: text between spaces, measured in the font
# of the element it is in). A name wrapped a character per line is the failure this finds.
NARROW_CELLS = """(selector) => {
  const canvas = document.createElement("canvas").getContext("2d");
  const out = [];
  for (const cell of document.querySelectorAll(selector)) {
    if (cell.getClientRects().length === 0) continue;
    const style = getComputedStyle(cell);
    const room = cell.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
    const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
    let widest = 0, word = "";
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      canvas.font = getComputedStyle(node.parentElement).font;
      for (const w of node.textContent.split(/\\s+/)) {
        const width = canvas.measureText(w).width;
        if (width > widest) { widest = width; word = w; }
      }
    }
    if (widest > room + 1) out.push(`${word}: ${Math.round(widest)}px in ${Math.round(room)}px`);
  }
  return out;
}"""


def pages_of(inst: Installation) -> list[str]:
    return [
        "/dashboard",
        "/flows",
        f"/flows/{inst.retried_id}",
        f"/flows/{inst.streamed_id}",
        "/keys",
        "/keys/1",
        "/upstreams",
        "/groups/2",
        "/models",
        "/clients",
        "/clients/1",
        "/audit",
    ]


@pytest.mark.parametrize("width, height", WIDTHS, ids=[f"{w}px" for w, _ in WIDTHS])
def test_every_page_fits_the_window_and_the_dashboard_keeps_its_words_whole(
    installation: Installation,
    new_page: Callable[..., Page],
    browser_events: BrowserEvents,
    width: int,
    height: int,
):
    wait_for(
        lambda: admin_api(installation.kr, "/api/dashboard")["windows"][-1]["requests"] >= 42,
        what="the seeded day in the rollups",
    )
    page = new_page(width, height)
    problems: dict[str, object] = {}
    (ROOT / "tests/browser/screenshots/fit").mkdir(parents=True, exist_ok=True)
    for url in pages_of(installation):
        page.goto(url)
        expect(page.locator("h1")).to_be_visible()
        for details in page.locator("main details").all():  # what a reader opens must fit too
            details.evaluate("d => { d.open = true }")
        scroll_width, inner_width = page.evaluate("() => [document.scrollingElement.scrollWidth, innerWidth]")
        if scroll_width > inner_width:
            problems[f"{url} scrolls sideways"] = f"{scroll_width}px in {inner_width}px"
        if sticking := page.evaluate(STICKING_OUT):
            problems[f"{url} past the edge"] = sticking
        # Every page at every width, for a reader of the run (git-ignored, never the tracked ones).
        page.screenshot(
            path=ROOT / "tests/browser/screenshots/fit" / f"{width}{url.replace('/', '-')}.png", full_page=True
        )
    page.goto("/dashboard")
    cells = "table.breakdown td, table.breakdown th, .card dt, .card dd"
    if narrow := page.evaluate(NARROW_CELLS, cells):
        problems["/dashboard cells narrower than a word"] = narrow
    names = page.locator("table.breakdown td.name").all_inner_texts()
    assert LONG_CLIENT in "".join(names) and "gpt-4o-mini-2024-07-18" in names  # the seeded names are there
    assert "$1,234.5678" in page.locator("main").inner_text()  # a large cost, whole (not "$0.")
    logged_out = new_page(width, height, logged_in=False)
    logged_out.goto("/login")
    if logged_out.evaluate("() => document.scrollingElement.scrollWidth > innerWidth"):
        problems["/login scrolls sideways"] = True
    screenshot(page, f"dashboard-{width}.png", full_page=True)
    assert problems == {}
    assert browser_events.page_errors == [] and browser_events.csp_violations() == []


def test_an_azure_retry_shows_the_clients_request_and_its_curl_replays_to_200(
    installation: Installation, new_page: Callable[..., Page]
):
    page = new_page()
    page.goto("/flows")
    row = page.locator("table.flows tbody tr", has=page.locator(f'a[href="/flows/{installation.retried_id}"]'))
    expect(row.locator("td.c-path .method")).to_have_text("POST")
    expect(row.locator("td.c-path .path")).to_have_text(CLIENT_PATH)  # (the previews follow it in the cell)
    expect(row.locator("td.c-key")).to_contain_text("(2 tries)")
    row.locator("td.c-time a").click()

    expect(page.locator("h1")).to_have_text(re.compile(rf"^200 POST {re.escape(CLIENT_PATH)} gpt-4o$"))
    attempts = page.locator("table.attempts tbody tr")
    expect(attempts).to_have_count(2)
    azure_urls = [a["url"] for a in admin_api(installation.kr, f"/api/flows/{installation.retried_id}")["attempt_list"]]
    expect(attempts.locator("td.c-url")).to_have_text(azure_urls)
    assert [re.search(r"/deployments/([^/]+)/", u).group(1) for u in azure_urls] == ["prod-gpt4o", "backup-gpt4o"]
    expect(attempts.locator("td.c-group")).to_have_text(
        ["azure-sweden-central/production-primary", "azure-sweden-central/production-backup"]
    )
    expect(attempts.locator("td.c-key")).to_have_text(["#1 (…cd01)", "#2 (…cd02)"])
    expect(attempts.locator("td.c-status")).to_have_text(["401", "200"])

    curl = page.locator("#curl").text_content()
    assert "$KEYROTOR_API_KEY" in curl and installation.client_key not in curl
    done = subprocess.run(
        ["sh", "-c", curl + " -s -o /dev/null -w '%{http_code}'"],
        capture_output=True,
        text=True,
        env={**os.environ, "KEYROTOR_API_KEY": installation.client_key},
        timeout=30,
    )
    assert done.stdout == "200", (curl, done.stdout, done.stderr)
    screenshot(page, "flow-retry.png", full_page=True)

    phone = new_page(390, 844)
    phone.goto(f"/flows/{installation.retried_id}")
    assert phone.evaluate("() => document.scrollingElement.scrollWidth <= innerWidth")
    cards = phone.locator("table.attempts tbody tr")
    assert cards.first.evaluate("e => getComputedStyle(e).display") == "flex"  # a card per attempt on a phone
    for url in cards.locator("td.c-url").all():
        assert url.evaluate("e => e.getBoundingClientRect().right") <= 390


def test_a_streams_raw_events_are_collapsed_and_readable_on_a_phone(
    installation: Installation, new_page: Callable[..., Page]
):
    page = new_page(390, 844)
    page.goto(f"/flows/{installation.streamed_id}")
    raw = page.locator("details.raw-events")
    expect(raw).not_to_have_attribute("open", re.compile(".*"))
    expect(raw.locator("table.events")).to_be_hidden()
    expect(page.locator("pre.streamed-text")).to_be_visible()
    raw.locator("summary").click()
    events = raw.locator("table.events tbody tr")
    expect(events.last.locator("pre")).to_have_text("data: [DONE]")
    for data in events.locator("td.event-data").all():
        box = data.evaluate("e => [e.getBoundingClientRect().left, e.getBoundingClientRect().right]")
        assert box[0] >= 0 and box[1] <= 390 and box[1] - box[0] > 250, box  # the card's width, not a sliver
    assert page.evaluate("() => document.scrollingElement.scrollWidth <= innerWidth")
    screenshot(page, "phone-flow.png", full_page=True)

    # A table too wide for its box (here: made so) scrolls inside it, and the box says so until its end.
    wrap = raw.locator(".table-wrap")
    expect(wrap).not_to_have_class(re.compile(r"\bscrolls\b"))
    raw.locator("table.events").evaluate("t => { t.classList.remove('stack'); t.style.minWidth = '1200px' }")
    expect(wrap).to_have_class(re.compile(r"\bscrolls\b"))
    hint = "e => getComputedStyle(e, '::before').content"
    assert wrap.evaluate(hint) == '"Scroll sideways for more →"'
    wrap.evaluate("e => { e.scrollLeft = e.scrollWidth }")
    expect(wrap).to_have_class(re.compile(r"\bat-end\b"))
    assert wrap.evaluate(hint) == '"← Scroll back"'
    assert page.evaluate("() => document.scrollingElement.scrollWidth <= innerWidth")  # the box scrolls, not the page


def test_the_login_page_shows_the_wait_when_throttled_and_the_right_key_still_works(
    ui: Keyrotor, new_page: Callable[..., Page]
):
    # Guesses from this address until it is locked out (core/login_throttle.py: the 6th locks it).
    for _ in range(6):
        refused = httpx.post(f"{ui.ui_url}/login", data={"admin_key": "kra-wrong-guess"}, timeout=30)
        assert refused.status_code in (401, 429)
    page = new_page(390, 844, logged_in=False)
    page.goto("/login")
    alert = page.get_by_role("alert")
    expect(alert).to_have_text(re.compile(r"^Too many wrong admin keys from this address: try again in \d+ s\b"))
    page.get_by_label("Admin key").fill("kra-another-wrong-guess")
    page.get_by_role("button", name="Log in").click()
    expect(alert).to_have_text(re.compile(r"try again in \d+ s\b"), timeout=20_000)
    assert "{" not in page.locator("main").inner_text()  # a sentence, never the JSON of the 429
    seconds = int(re.search(r"in (\d+) s", alert.inner_text()).group(1))
    expect(alert).not_to_contain_text(f"in {seconds} s", timeout=5_000)  # it counts down
    assert page.evaluate("() => document.scrollingElement.scrollWidth <= innerWidth")
    screenshot(page, "login-wait.png")
    page.get_by_label("Admin key").fill(ADMIN_KEY)  # the right key is never refused
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Dashboard", level=1)).to_be_visible()
