"""Many upstreams end to end: the openai client → a real mitmproxy running keyrotor → an OpenAI-style
relay serving some models and an Azure resource that accepts only its own paths and header."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator

import openai
import pytest

from tests.conftest import Keyrotor, raises, wait_for
from tests.fake_upstream import FakeAzure, FakeUpstream

RELAY_KEYS = ["sk-good-relay-aaaaaaaaaaaaaaaaaaaaaa01", "sk-good-relay-bbbbbbbbbbbbbbbbbbbbbb02"]
AZURE_KEY = "0123456789abcdef0123456789abcdef"
DEFAULT_KEY = "sk-good-default-cccccccccccccccccccc03"
MESSAGES = [{"role": "user", "content": "Route me"}]


@pytest.fixture
def relay() -> Iterator[FakeUpstream]:
    with FakeUpstream(models={"gpt-4o-mini", "gpt-4o-2024-11-20", "gpt-3.5-turbo"}).start() as up:
        yield up


@pytest.fixture
def azure() -> Iterator[FakeAzure]:
    deployments = {"prod-gpt4o": "gpt-4o-2024-08-06", "prod-embed": "text-embedding-3-small"}
    with FakeAzure(deployments).start() as up:
        up.set_key(AZURE_KEY, "ok")  # Azure's keys are 32 hex digits: not one of the fake's good names
        yield up


@pytest.fixture
def routed(keyrotor: Keyrotor, relay: FakeUpstream, azure: FakeAzure) -> tuple[Keyrotor, openai.OpenAI]:
    kr = keyrotor
    kr.setup("upstreams", "add", "relay", relay.url + "/v1")
    kr.setup("upstreams", "add", "azure", azure.url, "--dialect", "azure", "--api-version", "2024-10-21")
    kr.setup("groups", "add", "relay/cheap", "--priority", "10")
    kr.setup("groups", "add", "azure/prod", "--priority", "5")
    kr.setup("models", "add", "relay/cheap", "gpt-4o-mini")
    kr.setup("models", "add", "relay/cheap", "gpt-4o", "--as", "gpt-4o-2024-11-20")
    kr.setup("models", "add", "azure/prod", "gpt-4o", "--as", "prod-gpt4o")
    kr.setup("models", "add", "azure/prod", "text-embedding-3-small", "--as", "prod-embed")
    kr.setup("keys", "add", "--group", "relay/cheap", input="\n".join(RELAY_KEYS) + "\n")
    kr.setup("keys", "add", "--group", "azure/prod", input=AZURE_KEY + "\n")
    kr.add_keys(DEFAULT_KEY)
    kr.setup("groups", "disable", "default/default")  # so that a model nobody lists is served by nobody
    client_key = kr.add_client("alice")
    kr.start_proxy()
    return kr, openai.OpenAI(base_url=kr.base_url, api_key=client_key, max_retries=0, timeout=20)


def flow_rows(kr: Keyrotor) -> list[sqlite3.Row]:
    return kr.query(
        "SELECT f.*, u.name AS upstream, g.name AS grp FROM flows f LEFT JOIN upstreams u ON u.id = f.upstream_id"
        " LEFT JOIN groups g ON g.id = f.group_id ORDER BY f.id"
    )


def test_each_model_goes_to_the_group_that_serves_it(routed, relay, azure, upstream):
    kr, client = routed
    assert client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).choices[0].message.content
    embedding = client.embeddings.create(model="text-embedding-3-small", input=["one"])
    assert len(embedding.data) == 1
    assert [(r.path, r.key) for r in relay.received] == [("/v1/chat/completions", RELAY_KEYS[0])]
    (call,) = azure.received
    assert call.path == "/openai/deployments/prod-embed/embeddings"
    assert call.headers["api-key"] == AZURE_KEY and "authorization" not in call.headers
    assert upstream.received == []  # the disabled default group got nothing
    rows = wait_for(lambda: len(r := flow_rows(kr)) == 2 and r, what="two rows")
    assert [(r["upstream"], r["grp"], r["status"]) for r in rows] == [("relay", "cheap", 200), ("azure", "prod", 200)]


def test_an_alias_reaches_upstream_renamed_and_the_client_sees_its_own_name(routed, relay):
    _, client = routed
    answer = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert answer.model == "gpt-4o"
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    assert chunks and {c.model for c in chunks} == {"gpt-4o"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    sent = [json.loads(r.body)["model"] for r in relay.received]
    assert sent == ["gpt-4o-2024-11-20", "gpt-4o-2024-11-20"]


def test_a_group_whose_keys_are_all_invalid_falls_back_to_the_next_group(routed, relay, azure):
    kr, client = routed
    for key in RELAY_KEYS:
        relay.set_key(key, "invalid")
    for _ in range(6):
        answer = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert answer.choices[0].message.content  # zero client errors
    assert len(azure.received) == 6
    assert {r.path for r in azure.received} == {"/openai/deployments/prod-gpt4o/chat/completions"}
    assert all("authorization" not in r.headers for r in azure.received)
    assert sorted(r.key for r in relay.received) == sorted(RELAY_KEYS)  # each invalid key tried once
    rows = wait_for(lambda: len(r := flow_rows(kr)) == 6 and r, what="six rows")
    assert {(r["upstream"], r["status"]) for r in rows} == {("azure", 200)}
    conn = sqlite3.connect(kr.db_path)
    attempts = conn.execute("SELECT group_id, status FROM attempts ORDER BY id").fetchall()
    conn.close()
    assert [s for _, s in attempts[:3]] == [401, 401, 200] and len({g for g, _ in attempts[:3]}) == 2


def test_a_model_nobody_serves_gets_404_without_upstream_traffic(routed, relay, azure, upstream):
    _, client = routed
    error = raises(lambda: client.chat.completions.create(model="claude-3", messages=MESSAGES))
    assert isinstance(error, openai.NotFoundError)
    assert error.code == "model_not_found" and "claude-3" in error.message
    assert relay.received == azure.received == upstream.received == []


def test_models_lists_what_the_groups_serve_each_once(routed, relay, azure):
    _, client = routed
    assert sorted(m.id for m in client.models.list()) == ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]
    assert relay.received == azure.received == []


def test_fallback_models_serve_a_model_no_group_has_and_the_row_says_so(routed, relay):
    kr, client = routed
    kr.cli("models", "fallback", "o1", "gpt-4o-mini")
    wait_for(lambda: not raises(lambda: client.chat.completions.create(model="o1", messages=MESSAGES)), what="reload")
    answer = client.chat.completions.create(model="o1", messages=MESSAGES)
    assert answer.model == "gpt-4o-mini"  # the model that answered
    assert json.loads(relay.received[-1].body)["model"] == "gpt-4o-mini"
    rows = wait_for(lambda: (r := flow_rows(kr)) and r[-1]["fallback_model"] and r, what="the fallback row")
    assert (rows[-1]["model"], rows[-1]["fallback_model"]) == ("o1", "gpt-4o-mini")


def test_a_model_added_while_the_proxy_runs_is_routed_within_a_second(routed, relay):
    kr, client = routed
    assert isinstance(
        raises(lambda: client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES)), openai.NotFoundError
    )
    kr.cli("models", "add", "relay/cheap", "gpt-3.5-turbo")
    wait_for(
        lambda: not raises(lambda: client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES)),
        timeout=3,
        what="the new model to be served",
    )


def test_models_refresh_asks_each_group_and_the_schedule_keeps_the_list_fresh(keyrotor, relay):
    kr = keyrotor
    kr.setup("upstreams", "add", "relay", relay.url + "/v1")
    kr.setup("groups", "add", "relay/cheap", "--priority", "10")
    kr.setup("models", "add", "relay/cheap", "mine", "--as", "gpt-4o-mini")  # by hand: stays
    kr.setup("keys", "add", "--group", "relay/cheap", input=RELAY_KEYS[0] + "\n")
    kr.setup("groups", "disable", "default/default")
    out = kr.cli("models", "refresh", "relay/cheap").stdout
    assert "relay/cheap: 3 model(s) listed, 3 added, 0 removed" in out
    listed = kr.cli("models", "list").stdout
    for model in ("gpt-3.5-turbo", "gpt-4o-2024-11-20", "gpt-4o-mini", "mine"):
        assert f"{model} " in listed
    assert relay.received[-1].path == "/v1/models" and relay.received[-1].key == RELAY_KEYS[0]

    relay.models.add("o3-mini")  # upstream starts selling a model
    kr.start_proxy("--set", "keypool.revalidate_seconds=1")
    client = openai.OpenAI(base_url=kr.base_url, api_key=kr.add_client("bob"), max_retries=0, timeout=20)
    wait_for(
        lambda: not raises(lambda: client.chat.completions.create(model="o3-mini", messages=MESSAGES)),
        timeout=10,
        what="the scheduled refresh to find o3-mini",
    )
    assert client.chat.completions.create(model="mine", messages=MESSAGES).model == "mine"


def test_a_model_rate_limited_in_one_group_goes_to_the_next_group_then_to_its_fallback(routed, relay, azure):
    kr, client = routed
    relay.faults.model_faults["gpt-4o-2024-11-20"] = "ratelimit_nohint"  # the relay's gpt-4o, on every key
    for _ in range(6):
        assert client.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices[0].message.content
    assert len(azure.received) == 6  # the next group served it, before the client saw an error
    assert client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).model == "gpt-4o-mini"
    # A model no other group serves: its fallback answers instead.
    relay.faults.model_faults["gpt-4o-mini"] = "ratelimit_nohint"
    kr.cli("models", "fallback", "gpt-4o-mini", "gpt-4o")

    def answered_by() -> str | None:
        try:
            return client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).model
        except openai.APIError:
            return None  # the proxy has not loaded the fallback yet: only the rate-limited group serves it

    wait_for(lambda: answered_by() == "gpt-4o-2024-08-06", timeout=30, what="the fallback answering")


def test_a_client_limited_to_one_group_is_served_by_that_group_only(routed, relay, azure):
    kr, _ = routed
    key = kr.cli("clients", "add", "bob", "--groups", "azure/prod").stdout.strip().splitlines()[-1]
    bob = openai.OpenAI(base_url=kr.base_url, api_key=key, max_retries=0, timeout=20)
    wait_for(lambda: not raises(lambda: bob.chat.completions.create(model="gpt-4o", messages=MESSAGES)), what="bob")
    for _ in range(5):  # the relay's group serves gpt-4o first for everyone else
        bob.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert relay.received == [] and len(azure.received) == 6
    error = raises(lambda: bob.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES))
    assert isinstance(error, openai.PermissionDeniedError) and error.code == "model_not_allowed"


# --------------------------------------------------------------------------- never diverted to a catch-all
# Each case keeps the shipped default: default/default lists no model, holds a good key, and serves
# every model no group lists. A model the relay lists goes to the relay only, then to its fallbacks.


@pytest.fixture
def beside_default(keyrotor: Keyrotor, relay: FakeUpstream) -> Keyrotor:
    kr = keyrotor
    kr.setup("upstreams", "add", "relay", relay.url + "/v1")
    kr.setup("groups", "add", "relay/cheap", "--priority", "10")
    kr.setup("models", "add", "relay/cheap", "gpt-4o-mini")
    kr.add_keys(DEFAULT_KEY)  # default/default, the catch-all
    return kr


def add_relay_keys(kr: Keyrotor) -> None:
    kr.setup("keys", "add", "--group", "relay/cheap", input="\n".join(RELAY_KEYS) + "\n")


def relay_key_ids(kr: Keyrotor) -> list[str]:
    rows = kr.query("SELECT k.id FROM upstream_keys k JOIN groups g ON g.id = k.group_id WHERE g.name = 'cheap'")
    return [str(r["id"]) for r in rows]


def started(kr: Keyrotor, *args: str) -> openai.OpenAI:
    client_key = kr.add_client("alice")
    kr.start_proxy(*args)
    return openai.OpenAI(base_url=kr.base_url, api_key=client_key, max_retries=0, timeout=20)


def relay_prompt(client: openai.OpenAI) -> openai.APIError | None:
    return raises(lambda: client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES))


def test_a_listed_model_whose_group_has_no_key_is_refused_not_sent_to_the_default(beside_default, relay, upstream):
    client = started(beside_default)
    for _ in range(2):
        error = relay_prompt(client)
        assert isinstance(error, openai.InternalServerError) and error.status_code == 503
        assert error.code == "no_upstream_key_configured"
    assert relay.received == upstream.received == []


@pytest.mark.parametrize("how", ["invalid", "disabled"])
def test_a_listed_model_whose_keys_are_unusable_is_refused_not_sent_to_the_default(
    how, beside_default, relay, upstream
):
    kr = beside_default
    add_relay_keys(kr)
    if how == "invalid":
        for key in RELAY_KEYS:
            relay.set_key(key, "invalid")
    else:
        kr.setup("keys", "disable", *relay_key_ids(kr))
    client = started(kr)
    for _ in range(3):  # the first learns the keys are invalid; the next find none usable
        error = relay_prompt(client)
        assert isinstance(error, openai.InternalServerError) and error.code == "no_upstream_key_available"
    assert sorted(r.key for r in relay.received) == (sorted(RELAY_KEYS) if how == "invalid" else [])
    assert upstream.received == []


def test_a_listed_model_whose_keys_rest_after_429_is_never_sent_to_the_default(beside_default, relay, upstream):
    kr = beside_default
    add_relay_keys(kr)
    for key in RELAY_KEYS:
        relay.set_key(key, "ratelimit")
    client = started(kr, "--set", "keypool.wait_max_seconds=1")
    for _ in range(3):
        error = relay_prompt(client)
        assert error is not None and error.status_code in (429, 503)  # upstream's 429, or every key resting
    assert relay.received and upstream.received == []
    rows = wait_for(lambda: len(r := flow_rows(kr)) == 3 and r, what="three rows")
    assert {r["upstream"] for r in rows} <= {"relay", None}


def test_a_model_nobody_lists_still_goes_to_the_catch_all(beside_default, relay, upstream):
    kr = beside_default
    add_relay_keys(kr)
    client = started(kr)
    assert client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES).model == "gpt-3.5-turbo"
    assert client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).choices
    assert [r.key for r in upstream.received] == [DEFAULT_KEY]
    assert [json.loads(r.body)["model"] for r in relay.received] == ["gpt-4o-mini"]


def test_an_explicit_fallback_to_the_catch_all_is_honoured(beside_default, relay, upstream):
    kr = beside_default
    add_relay_keys(kr)
    for key in RELAY_KEYS:
        relay.set_key(key, "invalid")
    kr.setup("models", "fallback", "gpt-4o-mini", "o1-mini")  # no group lists o1-mini: the catch-all's
    client = started(kr)
    for _ in range(2):
        assert client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).model == "o1-mini"
    assert [(r.key, json.loads(r.body)["model"]) for r in upstream.received] == [(DEFAULT_KEY, "o1-mini")] * 2
    rows = wait_for(lambda: len(r := flow_rows(kr)) == 2 and r, what="two rows")
    assert {(r["upstream"], r["model"], r["fallback_model"], r["status"]) for r in rows} == {
        ("default", "gpt-4o-mini", "o1-mini", 200)
    }


def test_a_listed_model_whose_groups_are_disabled_is_refused_not_sent_to_the_default(beside_default, relay, upstream):
    kr = beside_default
    add_relay_keys(kr)
    kr.setup("groups", "disable", "relay/cheap")  # the one enabled group left is the catch-all
    client = started(kr)
    error = relay_prompt(client)
    assert isinstance(error, openai.InternalServerError) and error.code == "no_upstream_group"
    assert "gpt-4o-mini" in error.message
    assert client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES).choices  # the catch-all's
    assert relay.received == [] and [json.loads(r.body)["model"] for r in upstream.received] == ["gpt-3.5-turbo"]
