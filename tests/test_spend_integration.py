"""Every client's spend today and this month, limited or not, end to end: the official openai client →
a real mitmproxy running keyrotor → the fake upstream; then the clients pages and their JSON twins.

Invariants: a client without any limit has its tokens and cost counted as one with a budget has;
what one client spends is never counted for another; the counts match what the flows recorded.
"""

from __future__ import annotations

import html

import httpx
import openai

from tests.conftest import ADMIN_KEY, Keyrotor, wait_for

GOOD = "sk-good-aaaaaaaaaaaaaaaaaaaaaaaaaaaa0001"
MESSAGES = [{"role": "user", "content": "Say hello to the proxy"}]


def client_id(kr: Keyrotor, name: str) -> int:
    return kr.query("SELECT id FROM clients WHERE name = ?", (name,))[0]["id"]


def test_an_unlimited_clients_spend_shows_on_the_clients_pages_and_api(keyrotor: Keyrotor):
    kr = keyrotor
    kr.add_keys(GOOD)
    free_key = kr.setup("clients", "add", "free").stdout.strip().splitlines()[-1]
    kr.setup("clients", "add", "bystander")  # never sends anything: its spend stays 0
    capped_key = kr.setup("clients", "add", "capped", "--daily-tokens", "100000").stdout.strip().splitlines()[-1]
    kr.start_proxy()
    kr.start_ui()

    free = openai.OpenAI(base_url=kr.base_url, api_key=free_key, max_retries=0, timeout=20)
    free.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    for _ in free.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True):
        pass  # a stream whose client did not ask for usage is counted too
    openai.OpenAI(base_url=kr.base_url, api_key=capped_key, max_retries=0, timeout=20).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES
    )

    free_id, bystander_id = client_id(kr, "free"), client_id(kr, "bystander")
    api = httpx.Client(base_url=kr.ui_url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)

    def recorded_tokens() -> int:
        rows = kr.query(
            "SELECT sum(coalesce(flows.prompt_tokens, 0) + coalesce(flows.completion_tokens, 0)) AS n FROM flows"
            " JOIN client_keys ON client_keys.id = flows.client_key_id WHERE client_keys.client_id = ?",
            (free_id,),
        )
        return rows[0]["n"] or 0

    # The proxy saves its counters within a second; the writer commits the flows within ~250 ms.
    wait_for(lambda: api.get(f"/api/clients/{free_id}").json()["spend"]["day_tokens"] > 0, 15, what="free's spend")
    wait_for(lambda: recorded_tokens() > 0, 15, what="the flows' rows")
    wait_for(
        lambda: api.get(f"/api/clients/{free_id}").json()["spend"]["day_tokens"] == recorded_tokens(),
        15,
        what="the spend of both requests",
    )
    spend = api.get(f"/api/clients/{free_id}").json()["spend"]
    assert spend["day_tokens"] == spend["month_tokens"] == recorded_tokens() > 0
    assert spend["day_usd"] == spend["month_usd"] > 0  # gpt-4o-mini is priced in prices.toml

    listed = {c["name"]: c for c in api.get("/api/clients").json()["clients"]}
    assert listed["free"]["limits"] == {} and listed["free"]["budgets"] == []
    assert listed["free"]["spend"] == spend
    assert listed["bystander"]["spend"] == {"day_tokens": 0, "day_usd": 0, "month_tokens": 0, "month_usd": 0}
    # A limited client, counted as before (its counter may be saved a flush after free's).
    capped_id = client_id(kr, "capped")
    wait_for(lambda: api.get(f"/api/clients/{capped_id}").json()["spend"]["day_tokens"] > 0, 15, what="capped's spend")
    assert api.get(f"/api/clients/{bystander_id}").json()["spend"]["day_tokens"] == 0

    page = httpx.Client(base_url=kr.ui_url, follow_redirects=False, timeout=10)
    assert page.post("/login", data={"admin_key": ADMIN_KEY}).status_code == 303
    detail = html.unescape(page.get(f"/clients/{free_id}").text)
    assert f"Today: {spend['day_tokens']:g} tokens, ${spend['day_usd']:.4f}" in detail
    listing = html.unescape(page.get("/clients").text)
    assert f"{spend['day_tokens']:g} tok, ${spend['day_usd']:.4f}" in listing
