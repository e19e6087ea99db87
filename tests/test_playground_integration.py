"""The chat playground end to end (docs/playground.md): the real proxy in front of the fake upstream, the real
UI, its JSON twin driven as a script would; `run.py playground` as a person types it."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import ADMIN_KEY, Keyrotor, stored_flows, wait_for
from tests.fake_upstream import FakeUpstream

KEYS = ("sk-good-play-aaaaaaaaaaaaaaaaaaaaaaaa01",)
RELAY_KEY = "sk-good-relay-bbbbbbbbbbbbbbbbbbbbbb02"
MODEL = "gpt-4o-mini"
ANSWER = "Hello from the fake upstream. Your last message had {n} words."


@pytest.fixture
def relay() -> Iterator[FakeUpstream]:
    with FakeUpstream(models={MODEL}).start() as up:
        yield up


@pytest.fixture
def kr(keyrotor: Keyrotor, relay: FakeUpstream) -> Keyrotor:
    """default/default (every model) and relay/cheap (gpt-4o-mini, first); client alice; proxy and UI running."""
    keyrotor.add_upstream_serving("relay/cheap", relay.url + "/v1", MODEL, RELAY_KEY)
    keyrotor.add_keys(*KEYS)
    keyrotor.add_client("alice")
    keyrotor.start_proxy()
    keyrotor.start_ui("--proxy-port", str(keyrotor.proxy_port))  # the UI reaches the proxy there
    return keyrotor


def admin(kr: Keyrotor, key: str | None = ADMIN_KEY) -> httpx.Client:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=kr.ui_url, headers=headers, timeout=60, trust_env=False)


def chat(kr: Keyrotor, **ask) -> tuple[httpx.Response, bytes]:
    with admin(kr) as ui, ui.stream("POST", "/api/playground/chat", json={"model": MODEL, **ask}) as response:
        return response, response.read()


def conversation(kr: Keyrotor, conversation_id: str, stored: int | None = None) -> dict:
    """The conversation, once its last `stored` turns' flows are stored (all of them by default)."""

    def read() -> dict | None:
        with admin(kr) as ui:
            found = ui.get(f"/api/playground/conversations/{conversation_id}").json()
        turns = found["turns"] if stored is None else found["turns"][-stored:]
        return found if all(t["flow_row_id"] for t in turns) else None

    return wait_for(read, timeout=20, what="the turns' flows stored")


def test_a_streamed_chat_is_a_flow_of_the_playground_client_tagged_with_its_conversation(
    kr: Keyrotor, relay: FakeUpstream
):
    response, body = chat(kr, prompt="how are you today", stream=True)
    assert response.status_code == 200, body
    assert response.headers["content-type"].startswith("text/event-stream")
    assert body.count(b"data: ") >= 5  # the proxy's events, passed on as they came
    conversation_id, flow_id = response.headers["x-keyrotor-conversation"], response.headers["x-keyrotor-flow"]
    assert relay.received[-1].key == RELAY_KEY  # routed like any request: relay/cheap first
    kept = conversation(kr, conversation_id)
    assert kept["client"] == "playground" and kept["title"] == "how are you today"
    [turn] = kept["turns"]
    assert turn["answer"] == ANSWER.format(n=4) and turn["flow_id"] == flow_id and turn["error"] is None
    assert turn["total_tokens"] > 0 and turn["completion_tokens"] == len(turn["answer"].split())
    assert turn["duration_ms"] is not None and turn["first_byte_ms"] is not None
    [flow] = [f for f in stored_flows(kr.db_path) if f["id"] == turn["flow_row_id"]]
    playground = kr.query("SELECT id, builtin FROM clients WHERE name = 'playground'")[0]
    assert flow["client_id"] == playground["id"] and playground["builtin"] == 1
    assert flow["flow_id"] == flow_id and flow["stream"]
    # The conversation's id travels as x-keyrotor-session: recorded as the flow's session, never sent upstream.
    assert kr.query("SELECT session FROM flows WHERE id = ?", [flow["id"]])[0]["session"] == conversation_id
    assert all("x-keyrotor-session" not in {n.lower() for n in r.headers} for r in relay.received)
    assert "krp1." not in json.dumps(flow, default=str)


def test_continuing_sends_the_earlier_turns_and_a_pin_and_client_are_kept(
    kr: Keyrotor, upstream: FakeUpstream, relay: FakeUpstream
):
    first, _ = chat(kr, prompt="one two three", system="Be brief.", stream=False, client="alice")
    assert first.status_code == 200 and first.headers["content-type"].startswith("application/json")
    conversation_id = first.headers["x-keyrotor-conversation"]
    second, body = chat(kr, prompt="and four", conversation=conversation_id, group="default/default", client="alice")
    assert second.status_code == 200, body
    assert second.headers["x-keyrotor-conversation"] == conversation_id
    assert upstream.received[-1].key == KEYS[0]  # pinned to default/default, though relay/cheap comes first
    sent = json.loads(upstream.received[-1].body)
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "one two three"},
        {"role": "assistant", "content": ANSWER.format(n=3)},
        {"role": "user", "content": "and four"},
    ]
    kept = conversation(kr, conversation_id)
    assert [t["answer"] for t in kept["turns"]] == [ANSWER.format(n=3), ANSWER.format(n=2)]
    assert kept["client"] == "alice" and kept["group"] == "default/default"
    alice = kr.query("SELECT id FROM clients WHERE name = 'alice'")[0]["id"]
    rows = {f["id"]: f for f in stored_flows(kr.db_path)}
    assert {rows[t["flow_row_id"]]["client_id"] for t in kept["turns"]} == {alice}
    assert "pinned to default/default" in rows[kept["turns"][1]["flow_row_id"]]["pin_note"]


def test_a_deleted_conversation_leaves_the_history_its_flows_stay_and_the_audit_log_says_so(kr: Keyrotor):
    response, _ = chat(kr, prompt="forget me")
    conversation_id = response.headers["x-keyrotor-conversation"]
    flow_row = conversation(kr, conversation_id)["turns"][0]["flow_row_id"]
    with admin(kr) as ui:
        assert [c["id"] for c in ui.get("/api/playground/conversations").json()["conversations"]] == [conversation_id]
        deleted = ui.delete(f"/api/playground/conversations/{conversation_id}")
        assert deleted.json() == {"deleted": conversation_id, "turns": 1}
        assert ui.get(f"/api/playground/conversations/{conversation_id}").status_code == 404
        assert ui.delete(f"/api/playground/conversations/{conversation_id}").status_code == 404
        assert ui.get("/api/playground/conversations").json() == {"conversations": []}
        assert conversation_id not in ui.get("/playground").text
        again = ui.post("/api/playground/chat", json={"model": MODEL, "prompt": "x", "conversation": conversation_id})
        assert again.status_code == 404
    assert kr.query("SELECT id FROM flows WHERE id = ?", (flow_row,))  # unlinked, not deleted
    actions = [(r["action"], r["target"]) for r in kr.query("SELECT action, target FROM audit_log ORDER BY id")]
    assert ("playground.chat", conversation_id) in actions and ("playground.delete", conversation_id) in actions


def test_captured_markup_is_text_on_the_page(kr: Keyrotor):
    response, _ = chat(kr, prompt="<script>alert(1)</script> <img src=x onerror=alert(2)>")
    conversation_id = response.headers["x-keyrotor-conversation"]
    with admin(kr) as ui:
        page = ui.get(f"/playground?conversation={conversation_id}").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert" not in page and "<img src=x" not in page


def test_a_client_over_its_budget_is_refused_and_the_refusal_is_the_turn_s(kr: Keyrotor, relay: FakeUpstream):
    kr.setup("clients", "set", "alice", "--daily-tokens", "20")

    def refused() -> tuple[httpx.Response, bytes] | None:
        response, body = chat(kr, prompt="spend it all " * 5, client="alice")
        return (response, body) if response.status_code == 429 else None

    response, body = wait_for(refused, timeout=30, what="alice's budget spent")
    assert json.loads(body)["error"]["code"] == "insufficient_quota"
    kept = conversation(kr, response.headers["x-keyrotor-conversation"])
    turn = kept["turns"][-1]
    assert turn["status"] == 429 and turn["answer"] is None and "budget" in turn["error"].lower()
    # A refused turn is not sent again when the conversation goes on.
    kr.setup("clients", "set", "alice", "--daily-tokens", "none")
    wait_for(
        lambda: chat(kr, prompt="again", conversation=kept["id"], client="alice")[0].status_code == 200,
        timeout=20,
        what="the budget lifted",
    )
    turns = conversation(kr, kept["id"])["turns"]
    answered = [t["prompt"] for t in turns[:-1] if t["answer"] is not None]
    sent = json.loads(relay.received[-1].body)["messages"]
    assert [m["content"] for m in sent if m["role"] == "user"] == [*answered, "again"]
    assert len(answered) < len(turns) - 1  # the refused one is among the turns, not among what was sent


UI_APIS = (
    ("GET", "/api/playground"),
    ("GET", "/api/playground/conversations"),
    ("GET", "/api/playground/conversations/pg-0123456789abcdef"),
    ("DELETE", "/api/playground/conversations/pg-0123456789abcdef"),
    ("POST", "/api/playground/chat"),
)


def test_every_playground_api_needs_the_admin(kr: Keyrotor, upstream: FakeUpstream, relay: FakeUpstream):
    client_key = kr.setup("clients", "keys", "alice", "add").stdout.strip().splitlines()[-1]
    chat(kr, prompt="a conversation to reach for")
    [conversation_id] = [r["id"] for r in kr.query("SELECT id FROM playground_conversations")]
    before = len(upstream.received) + len(relay.received)
    # No credential: 401 (a page: the login). A client key is a wrong admin key: 401, then 429 as guesses go on.
    for key, refusals in ((None, {401}), (client_key, {401, 429})):
        with admin(kr, key) as ui:
            for method, path in (*UI_APIS, ("DELETE", f"/api/playground/conversations/{conversation_id}")):
                ask = {"model": MODEL, "prompt": "hi", "conversation": conversation_id} if method == "POST" else None
                response = ui.request(method, path, json=ask)
                assert response.status_code in refusals, (key, method, path, response.text)
                assert "a conversation to reach" not in response.text
            page = ui.get(f"/playground?conversation={conversation_id}")
            assert page.status_code in (refusals - {401}) | {303}, page.text
            assert "a conversation to reach" not in page.text
            assert ui.post(f"/playground/{conversation_id}/delete").status_code in (303, 403, 429)
    assert len(upstream.received) + len(relay.received) == before
    assert kr.query("SELECT count(*) AS n FROM playground_turns")[0]["n"] == 1


BAD_ASKS = (
    ({"prompt": "hi", "model": ""}, 422),
    ({"prompt": "", "model": MODEL}, 422),
    ({"prompt": "   ", "model": MODEL}, 422),
    ({"prompt": "hi", "model": MODEL, "temperature": 7}, 422),
    ({"prompt": "hi", "model": MODEL, "max_tokens": 0}, 422),
    ({"prompt": "hi", "model": MODEL, "client": "nobody"}, 404),
    ({"prompt": "hi", "model": MODEL, "group": "no/such"}, 404),
    ({"prompt": "hi", "model": MODEL, "conversation": "pg-ffffffffffffffff"}, 404),
    ({"prompt": "hi"}, 422),
)


def test_bad_asks_are_refused_and_change_nothing(kr: Keyrotor, upstream: FakeUpstream, relay: FakeUpstream):
    with admin(kr) as ui:
        for ask, status in BAD_ASKS:
            response = ui.post("/api/playground/chat", json=ask)
            assert response.status_code == status, (ask, response.text)
            assert response.json()["error"]["message"]
    assert not upstream.received and not relay.received
    assert not kr.query("SELECT 1 FROM playground_turns")


def test_run_py_playground_asks_lists_shows_and_deletes(kr: Keyrotor):
    port = ("--proxy-port", str(kr.proxy_port))
    asked = kr.cli("playground", "ask", MODEL, "hello there friend", "--group", "default/default", *port)
    assert ANSWER.format(n=3) in asked.stdout
    conversation_id = asked.stderr.split("conversation ", 1)[1].split(":", 1)[0]
    assert "flow #" in asked.stderr and "tokens" in asked.stderr
    again = kr.cli("playground", "ask", MODEL, "more", "--conversation", conversation_id, "--no-stream", *port)
    assert ANSWER.format(n=1) in again.stdout
    listed = kr.cli("playground", "list").stdout
    assert conversation_id in listed and "hello there friend" in listed
    shown = kr.cli("playground", "show", conversation_id).stdout
    assert "> hello there friend" in shown and "> more" in shown and shown.count("flow #") == 2
    refused = kr.cli("playground", "ask", MODEL, "hi", "--client", "nobody", *port, check=False)
    assert refused.returncode == 1 and "There is no client 'nobody'" in refused.stderr
    assert "deleted" in kr.cli("playground", "delete", conversation_id).stdout
    assert conversation_id not in kr.cli("playground", "list").stdout
    assert ("playground.delete", "cli") in [
        (r["action"], r["actor"]) for r in kr.query("SELECT action, actor FROM audit_log")
    ]


def test_a_reader_that_hangs_up_mid_answer_leaves_a_cut_turn_that_is_not_sent_again(kr: Keyrotor, relay: FakeUpstream):
    relay.stream_chunks, relay.stream_delay = 20, 0.2
    with admin(kr) as ui, ui.stream("POST", "/api/playground/chat", json={"model": MODEL, "prompt": "go slow"}) as r:
        conversation_id = r.headers["x-keyrotor-conversation"]
        first = next(r.iter_raw())
        assert b"data: " in first
    # The page went away a second into a four-second answer: the turn keeps why, and no answer.

    def cut() -> dict | None:
        with admin(kr) as ui:
            [turn] = ui.get(f"/api/playground/conversations/{conversation_id}").json()["turns"]
        return turn if turn["error"] else None

    turn = wait_for(cut, timeout=20, what="the cut turn kept")
    assert turn["answer"] is None and "cut short" in turn["error"]
    relay.stream_chunks, relay.stream_delay = 5, 0.0
    response, _ = chat(kr, prompt="again", conversation=conversation_id)
    assert response.status_code == 200
    sent = json.loads(relay.received[-1].body)["messages"]
    assert sent == [{"role": "user", "content": "again"}]
