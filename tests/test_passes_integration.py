"""Requests the UI sends through the real proxy under a client, with a pass (core/passes.py,
monitor_ui/through_proxy.py): routed, limited and captured like any other, pinned where the admin
asked, and refused like a bad key when the pass is forged, expired, reused or ambiguous."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest

from core import passes
from monitor_ui.through_proxy import ProxyTarget, build_pass, ensure_builtin_client, open_through_proxy
from storage import db
from tests.conftest import Keyrotor, wait_for
from tests.fake_upstream import FakeUpstream

RELAY_KEY = "sk-good-relay-aaaaaaaaaaaaaaaaaaaaaa01"
DEFAULT_KEYS = ("sk-good-default-cccccccccccccccccccc03", "sk-good-default-dddddddddddddddddddd04")
BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture
def relay() -> Iterator[FakeUpstream]:
    with FakeUpstream(models={"gpt-4o-mini"}).start() as up:
        yield up


@pytest.fixture
def kr(keyrotor: Keyrotor, relay: FakeUpstream) -> Keyrotor:
    """default/default (two keys, every model) and relay/cheap (gpt-4o-mini, ahead of it); client alice."""
    keyrotor.add_upstream_serving("relay/cheap", relay.url + "/v1", "gpt-4o-mini", RELAY_KEY)
    keyrotor.add_keys(*DEFAULT_KEYS)
    keyrotor.add_client("alice")
    keyrotor.start_proxy()
    return keyrotor


def settings_of(kr: Keyrotor) -> ProxyTarget:
    return ProxyTarget(kr.db_path, f"http://0.0.0.0:{kr.proxy_port}")


def ids(kr: Keyrotor) -> dict[str, int]:
    """Client, group and key ids by name: alice, relay/cheap, default/default, each upstream key's last4."""
    found = {r["name"]: r["id"] for r in kr.query("SELECT id, name FROM clients")}
    for row in kr.query(
        "SELECT g.id, u.name || '/' || g.name AS label FROM groups g JOIN upstreams u ON u.id = g.upstream_id"
    ):
        found[row["label"]] = row["id"]
    for row in kr.query("SELECT id, last4 FROM upstream_keys"):
        found[row["last4"]] = row["id"]
    return found


def send(kr: Keyrotor, client_id: int, body: bytes = BODY, **pins) -> tuple[int, bytes]:
    async def go() -> tuple[int, bytes]:
        async with open_through_proxy(settings_of(kr), client_id, "POST", "/v1/chat/completions", body, **pins) as r:
            return r.status_code, await r.aread()

    return asyncio.run(go())


def raw(kr: Keyrotor, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{kr.base_url}/chat/completions", content=BODY, headers=headers, timeout=20, trust_env=False)


def last_flow(kr: Keyrotor) -> dict:
    return dict(kr.query("SELECT * FROM flows ORDER BY id DESC LIMIT 1")[0])


def flows_written(kr: Keyrotor, count: int) -> list[dict]:
    return wait_for(lambda: len(rows := kr.query("SELECT * FROM flows ORDER BY id")) >= count and rows, what="flows")


def test_a_pass_runs_as_its_client_pinned_to_a_group_and_never_reaches_upstream(
    kr: Keyrotor, upstream: FakeUpstream, relay: FakeUpstream
):
    found = ids(kr)
    status, body = send(kr, found["alice"])  # unpinned: routed as alice's requests are (relay first)
    assert status == 200, body
    assert relay.received[-1].headers.get("authorization") == f"Bearer {RELAY_KEY}"
    status, body = send(kr, found["alice"], group_id=found["default/default"], replay_of=1)
    assert status == 200, body
    got = upstream.received[-1]
    assert got.key in DEFAULT_KEYS  # the pinned group, though relay/cheap comes first
    for received in (*relay.received, *upstream.received):
        assert passes.PASS_HEADER not in received.headers
    rows = flows_written(kr, 2)
    assert [r["client_id"] for r in rows] == [found["alice"]] * 2
    alice_key = kr.query("SELECT min(id) AS id FROM client_keys WHERE client_id = ?", (found["alice"],))[0]["id"]
    assert [r["client_key_id"] for r in rows] == [alice_key] * 2  # usage counts on the client's first key
    assert rows[1]["replay_of"] == 1 and rows[1]["group_id"] == found["default/default"]
    assert "pinned to default/default" in rows[1]["pin_note"]
    text = kr.query("SELECT group_concat(request_headers, '') AS h FROM flows")[0]["h"] or ""
    stored = json.dumps([db_row_text(kr, r["id"]) for r in rows])
    assert "krp1." not in text + stored and passes.PASS_HEADER not in stored.lower()


def db_row_text(kr: Keyrotor, row_id: int) -> str:
    from tests.conftest import stored_flows

    return json.dumps([f for f in stored_flows(kr.db_path) if f["id"] == row_id], default=str)


def test_a_pinned_key_serves_alone_and_a_deleted_one_leaves_its_group_s_pool(kr: Keyrotor, upstream: FakeUpstream):
    found = ids(kr)
    second = found[DEFAULT_KEYS[1][-4:]]
    for _ in range(3):
        assert send(kr, found["alice"], key_id=second)[0] == 200
        assert upstream.received[-1].key == DEFAULT_KEYS[1]
    kr.setup("keys", "delete", str(second))

    def served_by_the_pool() -> bool:
        assert send(kr, found["alice"], key_id=second, group_id=found["default/default"])[0] == 200
        return upstream.received[-1].key == DEFAULT_KEYS[0]

    wait_for(served_by_the_pool, what="the deleted key's group's pool to serve")
    row = wait_for(lambda: (r := last_flow(kr))["upstream_key_id"] != second and r, what="its flow")
    assert f"pinned upstream key #{second} has been deleted: the pool served it" in row["pin_note"]


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda key, client: passes.mint(b"another installation's key", client), id="other-secret"),
        pytest.param(lambda key, client: passes.mint(key, client, now=time.time() - 300), id="expired"),
        pytest.param(lambda key, client: passes.mint(key, client, seconds=3600), id="too-long-lived"),
        pytest.param(lambda key, client: passes.mint(key, client)[:-3] + "AAA", id="forged-mac"),
        pytest.param(lambda key, client: passes.mint(key, 999), id="unknown-client"),
        pytest.param(lambda key, client: "krp1.e30.", id="garbage"),
        pytest.param(lambda key, client: "", id="empty"),
    ],
)
def test_a_bad_pass_is_refused_like_a_bad_key(kr: Keyrotor, upstream: FakeUpstream, make):
    from storage import secrets

    before = len(upstream.received)
    token = make(secrets.pass_key(kr.db_path), ids(kr)["alice"])
    response = raw(kr, {passes.PASS_HEADER: token, "content-type": "application/json"})
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert len(upstream.received) == before


def test_a_pass_serves_one_request_and_never_with_a_client_key(kr: Keyrotor):
    alice = ids(kr)["alice"]
    token = build_pass(settings_of(kr), alice)
    assert raw(kr, {passes.PASS_HEADER: token}).status_code == 200
    again = raw(kr, {passes.PASS_HEADER: token})
    assert again.status_code == 401 and again.json()["error"]["code"] == "invalid_api_key"
    key = kr.setup("clients", "keys", "alice", "add").stdout.strip().splitlines()[-1]
    both = raw(kr, {passes.PASS_HEADER: build_pass(settings_of(kr), alice), "authorization": f"Bearer {key}"})
    assert both.status_code == 401 and both.json()["error"]["code"] == "ambiguous_credentials"
    assert key not in both.text


def test_a_pass_cannot_pin_a_group_or_key_its_client_may_not_use(kr: Keyrotor, upstream: FakeUpstream):
    found = ids(kr)
    kr.setup("clients", "set", "alice", "--groups", "relay/cheap")

    def refused(**pins) -> dict:
        status, body = send(kr, found["alice"], **pins)
        return json.loads(body)["error"] if status == 403 else {}

    error = wait_for(lambda: refused(group_id=found["default/default"]), what="the new limits")
    before = len(upstream.received)  # (until the proxy's poll sees the change, alice may use any group)
    assert refused(group_id=found["default/default"])["code"] == "group_not_allowed"
    assert error["code"] == "group_not_allowed"
    assert refused(key_id=found[DEFAULT_KEYS[0][-4:]])["code"] == "group_not_allowed"
    assert len(upstream.received) == before
    assert send(kr, found["alice"], group_id=found["relay/cheap"])[0] == 200


def test_a_client_over_its_budget_is_refused_under_a_pass_too(kr: Keyrotor):
    alice = ids(kr)["alice"]
    kr.setup("clients", "set", "alice", "--daily-tokens", "20")

    def over() -> bool:
        status, body = send(kr, alice)
        return status == 429 and json.loads(body)["error"]["code"] == "insufficient_quota"

    wait_for(over, timeout=20, what="the budget spent")


def test_the_builtin_client_is_made_once_and_served(kr: Keyrotor):
    conn = db.connect(kr.db_path)
    try:
        first = ensure_builtin_client(conn)
        assert ensure_builtin_client(conn) == first
        assert conn.execute("SELECT builtin FROM clients WHERE id = ?", (first,)).fetchone()[0] == 1
    finally:
        conn.close()
    wait_for(lambda: send(kr, first)[0] == 200, what="the proxy to know the playground client")
