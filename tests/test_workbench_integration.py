"""Replay, compare and the request diff end to end (docs/workbench.md): the official openai client →
the real proxy → fake upstreams; the real UI replays through the real proxy under the flow's client."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import ADMIN_KEY, Keyrotor, wait_for
from tests.fake_upstream import FakeAzure, FakeUpstream
from tests.monitor_ui.conftest import csrf_of

RELAY_KEYS = ("sk-good-relay-aaaaaaaaaaaaaaaaaaaaaa01", "sk-good-relay-bbbbbbbbbbbbbbbbbbbbbb02")
DEFAULT_KEY = "sk-good-default-cccccccccccccccccccc03"
AZURE_KEY = "0123456789abcdef0123456789abcdef"
AUTH = {"authorization": f"Bearer {ADMIN_KEY}"}
MESSAGES = [{"role": "user", "content": "Tell me about replays"}]


@pytest.fixture
def relay() -> Iterator[FakeUpstream]:
    with FakeUpstream(models={"gpt-4o-mini", "gpt-4o-2024-11-20"}).start() as up:
        yield up


@pytest.fixture
def azure() -> Iterator[FakeAzure]:
    with FakeAzure({"prod-gpt4o": "gpt-4o-2024-08-06"}).start() as up:
        up.set_key(AZURE_KEY, "ok")
        yield up


@pytest.fixture
def bench(keyrotor: Keyrotor, relay: FakeUpstream, azure: FakeAzure) -> tuple[Keyrotor, openai.OpenAI, str]:
    """relay/cheap (two keys: gpt-4o-mini, and gpt-4o as gpt-4o-2024-11-20) ahead of default/default (every
    model); azure/prod (gpt-4.1 as deployment prod-gpt4o); client alice; the proxy and the UI running."""
    kr = keyrotor
    kr.setup("upstreams", "add", "relay", relay.url + "/v1")
    kr.setup("upstreams", "add", "azure", azure.url, "--dialect", "azure", "--api-version", "2024-10-21")
    kr.setup("groups", "add", "relay/cheap", "--priority", "10")
    kr.setup("groups", "add", "azure/prod", "--priority", "5")
    kr.setup("models", "add", "relay/cheap", "gpt-4o-mini")
    kr.setup("models", "add", "relay/cheap", "gpt-4o", "--as", "gpt-4o-2024-11-20")
    kr.setup("models", "add", "azure/prod", "gpt-4.1", "--as", "prod-gpt4o")
    kr.setup("keys", "add", "--group", "relay/cheap", input="\n".join(RELAY_KEYS) + "\n")
    kr.setup("keys", "add", "--group", "azure/prod", input=AZURE_KEY + "\n")
    kr.add_keys(DEFAULT_KEY)
    client_key = kr.add_client("alice")
    kr.start_proxy()
    kr.start_ui("--proxy-port", str(kr.proxy_port))
    return kr, openai.OpenAI(base_url=kr.base_url, api_key=client_key, max_retries=0, timeout=20), client_key


def ui(kr: Keyrotor) -> httpx.Client:
    return httpx.Client(base_url=kr.ui_url, headers=AUTH, timeout=60, trust_env=False)


def newest_flow(kr: Keyrotor, count: int) -> int:
    return wait_for(lambda: len(rows := kr.query("SELECT id FROM flows ORDER BY id")) >= count and rows[-1]["id"])


def group_id(kr: Keyrotor, label: str) -> int:
    upstream, _, name = label.partition("/")
    sql = "SELECT g.id FROM groups g JOIN upstreams u ON u.id = g.upstream_id WHERE u.name = ? AND g.name = ?"
    return kr.query(sql, (upstream, name))[0]["id"]


def no_secret_in(text: str, client_key: str) -> None:
    for secret in (*RELAY_KEYS, DEFAULT_KEY, AZURE_KEY, client_key, ADMIN_KEY):
        assert secret not in text
    assert "krp1." not in text  # no pass either


def test_a_plain_and_a_streamed_flow_replayed_against_another_group(bench, relay: FakeUpstream, upstream):
    kr, client, client_key = bench
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    plain = newest_flow(kr, 1)
    list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    streamed = newest_flow(kr, 2)
    default = group_id(kr, "default/default")
    with ui(kr) as admin:
        for original in (plain, streamed):
            answer = admin.post(f"/api/flows/{original}/replay", json={"group": "default/default"})
            assert answer.status_code == 200, answer.text
            new = answer.json()
            assert new["replay_of"] == original and new["status"] == 200 and new["id"] > streamed
            detail = admin.get(f"/api/flows/{new['id']}").json()
            assert detail["replay_of"] == original and detail["group_id"] == default
            assert detail["client_id"] == kr.query("SELECT id FROM clients WHERE name = 'alice'")[0]["id"]
            assert "pinned to default/default" in detail["pin_note"]
            assert [r["id"] for r in admin.get(f"/api/flows/{original}").json()["replays"]] == [new["id"]]
            compared = admin.get("/api/flows/compare", params={"a": original, "b": new["id"]}).json()
            facts = {f["name"]: f for f in compared["facts"]}
            assert not facts["group_id"]["same"] and not facts["upstream_key_id"]["same"]
            assert compared["a"]["stream"] is compared["b"]["stream"] is (original == streamed)
            assert compared["text"]["a"] and compared["text"]["b"]  # a stream's text reassembled
            page = admin.get(f"/flows/{new['id']}").text
            assert f'href="/flows/{original}"' in page
            no_secret_in(page + json.dumps(detail) + json.dumps(compared), client_key)
        streamed_replay = kr.query("SELECT stream, chunk_times FROM flows ORDER BY id DESC LIMIT 1")[0]
        assert streamed_replay["stream"] == 1  # it streamed through the proxy, event by event
        audit = admin.get("/api/audit").json()["entries"]
        assert sum(e["action"] == "flows.replay" for e in audit) == 2
    for received in (*relay.received, *upstream.received):
        assert "x-keyrotor-pass" not in received.headers


def test_a_replay_of_a_flow_whose_key_was_deleted_uses_its_group_s_pool(bench, relay: FakeUpstream):
    kr, client, _ = bench
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    original = newest_flow(kr, 1)
    used = kr.query("SELECT upstream_key_id FROM flows WHERE id = ?", (original,))[0]["upstream_key_id"]
    kr.setup("keys", "delete", str(used))
    with ui(kr) as admin:

        def replayed_by_the_pool() -> dict | None:
            new = admin.post(f"/api/flows/{original}/replay").json()
            detail = admin.get(f"/api/flows/{new['id']}").json()
            return detail if "has been deleted" in (detail["pin_note"] or "") else None

        detail = wait_for(replayed_by_the_pool, timeout=15, what="the proxy to see the key gone")
    assert detail["status"] == 200 and detail["upstream_key_id"] not in (None, used)
    assert detail["group_id"] == group_id(kr, "relay/cheap")
    assert relay.received[-1].key in RELAY_KEYS and relay.received[-1].key != relay.received[0].key


def test_the_flow_page_shows_what_keyrotor_changed_without_a_secret(bench, azure: FakeAzure, relay: FakeUpstream):
    kr, client, client_key = bench
    client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)
    on_azure = newest_flow(kr, 1)
    list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    streamed = newest_flow(kr, 2)
    with ui(kr) as admin:
        diff = {(c["where"], c["name"].lower()): c for c in admin.get(f"/api/flows/{on_azure}").json()["request_diff"]}
        line = diff[("line", "request")]
        assert line["client"] == "POST /v1/chat/completions"
        assert "/openai/deployments/prod-gpt4o/chat/completions?api-version=2024-10-21" in line["sent"]
        assert diff[("header", "authorization")]["sent"] is None  # Azure takes its key in api-key
        assert diff[("header", "authorization")]["client"].startswith("Bearer [client key #")
        assert diff[("header", "api-key")]["client"] is None
        assert diff[("header", "api-key")]["sent"].startswith("[upstream key #")
        diff = {(c["where"], c["name"].lower()): c for c in admin.get(f"/api/flows/{streamed}").json()["request_diff"]}
        assert diff[("body", "model")]["client"] == "gpt-4o" and diff[("body", "model")]["sent"] == "gpt-4o-2024-11-20"
        options = diff[("body", "stream_options")]
        assert options["client"] is None and json.loads(options["sent"]) == {"include_usage": True}
        assert diff[("header", "authorization")]["sent"].startswith("Bearer [upstream key #")
        assert json.loads(relay.received[-1].body)["model"] == "gpt-4o-2024-11-20"
        pages = admin.get(f"/flows/{on_azure}").text + admin.get(f"/flows/{streamed}").text
        assert "What keyrotor changed on the way" in pages
        no_secret_in(pages + admin.get(f"/api/flows/{streamed}").text, client_key)
        # A replay sends what the client sent: its model, not the upstream's name, and no injected options.
        new = admin.post(f"/api/flows/{streamed}/replay").json()
        assert new["status"] == 200
        replayed = admin.get(f"/api/flows/{new['id']}").json()
        assert replayed["model"] == "gpt-4o" and json.loads(relay.received[-1].body)["model"] == "gpt-4o-2024-11-20"


def test_a_client_over_its_budget_cannot_be_replayed_past_it(bench):
    kr, client, _ = bench
    kr.setup("clients", "set", "alice", "--daily-tokens", "10")
    wait_for(lambda: _spent(client), timeout=15, what="alice's budget spent")
    original = kr.query("SELECT id FROM flows WHERE status = 200 ORDER BY id LIMIT 1")[0]["id"]
    with ui(kr) as admin:
        new = admin.post(f"/api/flows/{original}/replay").json()
        assert new["status"] == 429
        assert admin.get(f"/api/flows/{new['id']}").json()["refusal"] == "insufficient_quota"


def _spent(client: openai.OpenAI) -> bool:
    try:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    except openai.RateLimitError as e:
        return e.code == "insufficient_quota"
    return False


def test_a_batch_replays_a_search_and_sums_it_up(bench):
    kr, client, _ = bench
    for _ in range(3):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    newest_flow(kr, 3)
    with ui(kr) as admin:
        started = admin.post(
            "/api/flows/replays", params={"model": "gpt-4o-mini"}, json={"group": "default/default", "concurrency": 2}
        )
        assert started.status_code == 202, started.text
        job = started.json()["id"]
        done = wait_for(
            lambda: (s := admin.get(f"/api/flows/replays/{job}").json())["state"] == "finished" and s, timeout=60
        )
        # Seen once on CI (total 5): the flows then, so that a next time says where the other two came from.
        flows_then = [dict(r) for r in kr.query("SELECT id, path, model, status, client_id, replay_of FROM flows")]
        assert done["total"] == done["done"] == 3, (done, flows_then)
        assert all(r["replay"] is not None and r["status_b"] == 200 and r["text"] for r in done["rows"])
        assert "progress" in admin.get(f"/flows/replays/{job}").text
    assert len(kr.query("SELECT id FROM flows WHERE replay_of IS NOT NULL")) == 3


def test_the_flow_page_s_form_sends_again_and_follows_the_new_flow(bench):
    kr, client, _ = bench
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    original = newest_flow(kr, 1)
    with httpx.Client(base_url=kr.ui_url, timeout=60, trust_env=False) as browser:
        assert browser.post("/login", data={"admin_key": ADMIN_KEY}).status_code == 303
        page = browser.get(f"/flows/{original}").text
        csrf = csrf_of(page)
        form = {"csrf": csrf, "group": "default/default", "edit_body": "1"}
        form["body"] = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "edited"}]})
        sent = browser.post(f"/flows/{original}/replay", data=form)
        assert sent.status_code == 303, sent.text
        new = int(sent.headers["location"].rsplit("/", 1)[1])
        shown = browser.get(f"/flows/{new}").text
        assert f'Replay of</dt><dd><a href="/flows/{original}">#{original}</a>' in shown and "edited" in shown
        assert browser.post(f"/flows/{original}/replay", data={"csrf": "forged"}).status_code == 403
    audit = kr.query("SELECT changes FROM audit_log WHERE action = 'flows.replay'")
    assert json.loads(audit[0]["changes"])["body_edited"] is True


def test_run_py_flows_replay_and_compare(bench):
    kr, client, _ = bench
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    original = newest_flow(kr, 1)
    out = kr.cli("--proxy-port", str(kr.proxy_port), "flows", "replay", str(original), "--group", "default/default")
    new = int(out.stdout.split()[1].rstrip(":"))
    assert f"replay of {original}, answered 200" in out.stdout
    shown = kr.cli("flows", "compare", str(original), str(new)).stdout
    assert "*group_id" in shown
