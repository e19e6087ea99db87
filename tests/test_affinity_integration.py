"""Key affinity end to end: objects OpenAI scopes to a key's project stay with the key that made them.

The fake upstream keeps files, batches, stored responses and vector stores per key (another
key gets a 404, like another project at OpenAI); the proxy has three keys in round robin.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable

import httpx
import openai
import pytest

from tests.conftest import ADMIN_KEY, Keyrotor, batch_input, raises, wait_for
from tests.fake_upstream import FakeUpstream

KEYS = [f"sk-good-affinity-{n}-aaaaaaaaaaaaaaaaaaaa000{n}" for n in (1, 2, 3)]
MESSAGES = [{"role": "user", "content": "hello"}]
BATCH_INPUT = batch_input(3)


def refused_with_409(call: Callable[[], object], what: str) -> openai.APIStatusError:
    """`call`'s 409, once an admin change has reached the proxy (it polls for them)."""
    return wait_for(
        lambda: isinstance(e := raises(call), openai.APIStatusError) and e.status_code == 409 and e, what=what
    )


def client_for(kr: Keyrotor, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=kr.base_url, api_key=key, max_retries=0, timeout=20)


def key_id_of(value: str) -> int:
    return KEYS.index(value) + 1  # added in this order, so numbered so


def stored_owner(kr: Keyrotor, object_id: str) -> int | None:
    conn = sqlite3.connect(kr.db_path)
    try:
        row = conn.execute("SELECT upstream_key_id FROM object_owners WHERE object_id = ?", (object_id,)).fetchone()
    finally:
        conn.close()
    return row[0] if row else None


def keys_for(upstream: FakeUpstream, fragment: str) -> set[str]:
    return {r.key for r in upstream.received if fragment in r.path or fragment.encode() in r.body}


@pytest.fixture
def running(keyrotor: Keyrotor) -> tuple[Keyrotor, str]:
    client_key = keyrotor.start_serving(*KEYS)
    return keyrotor, client_key


def test_a_batch_stays_with_the_key_of_its_file(running, upstream: FakeUpstream):
    kr, client_key = running
    client = client_for(kr, client_key)
    uploaded = client.files.create(file=("requests.jsonl", BATCH_INPUT), purpose="batch")
    owner = upstream.objects.owner_of(uploaded.id)
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # the rotation moves on

    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    retrieved = client.batches.retrieve(batch.id)
    assert retrieved.status == "completed"
    assert client.files.content(uploaded.id).read() == BATCH_INPUT
    output = client.files.content(retrieved.output_file_id).read()
    assert [json.loads(line)["custom_id"] for line in output.splitlines()] == ["req-0", "req-1", "req-2"]

    assert upstream.objects.owner_of(batch.id) == owner
    assert keys_for(upstream, uploaded.id) == {owner}  # never tried on another key
    assert keys_for(upstream, batch.id) == {owner}
    chats = [r.key for r in upstream.received if r.path == "/v1/chat/completions"]
    assert owner not in chats or len(set(chats)) > 1  # stateless calls still rotate
    wait_for(lambda: stored_owner(kr, batch.id) == key_id_of(owner), what="the batch's owner stored")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_ten_chained_responses_stay_with_one_key(running, upstream: FakeUpstream, stream: bool):
    kr, client_key = running
    client = client_for(kr, client_key)
    previous = None
    ids = []
    for turn in range(10):
        extra = {"previous_response_id": previous} if previous else {}
        if stream:
            events = list(client.responses.create(model="gpt-4o-mini", input=f"turn {turn}", stream=True, **extra))
            completed = [e for e in events if e.type == "response.completed"]
            assert len(completed) == 1
            previous = completed[0].response.id
        else:
            previous = client.responses.create(model="gpt-4o-mini", input=f"turn {turn}", **extra).id
        ids.append(previous)
    owners = {upstream.objects.owner_of(i) for i in ids}
    assert len(owners) == 1
    assert {r.key for r in upstream.received if r.path == "/v1/responses"} == owners
    assert client.responses.retrieve(ids[-1]).id == ids[-1]


def test_the_owner_disabled_gives_a_clear_409(running, upstream: FakeUpstream):
    kr, client_key = running
    client = client_for(kr, client_key)
    uploaded = client.files.create(file=("notes.txt", b"some notes"), purpose="assistants")
    owner = upstream.objects.owner_of(uploaded.id)
    kr.cli("keys", "disable", str(key_id_of(owner)))
    seen = len(upstream.received)

    error = refused_with_409(lambda: client.files.retrieve(uploaded.id), what="the disabled owner to be refused")
    assert error.body["code"] == "object_owner_unavailable"
    assert uploaded.id in error.body["message"] and "disabled" in error.body["message"]
    assert all(uploaded.id not in r.path for r in upstream.received[seen:] if r.key != owner)
    # Stateless calls carry on with the other keys.
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


def test_objects_of_two_keys_in_one_request_give_409(running, upstream: FakeUpstream):
    kr, client_key = running
    client = client_for(kr, client_key)
    first = client.files.create(file=("a.txt", b"a"), purpose="assistants")
    second = client.files.create(file=("b.txt", b"b"), purpose="assistants")
    assert upstream.objects.owner_of(first.id) != upstream.objects.owner_of(second.id)  # round robin
    seen = len(upstream.received)

    error = raises(lambda: client.vector_stores.create(name="both", file_ids=[first.id, second.id]))
    assert isinstance(error, openai.APIStatusError) and error.status_code == 409
    assert error.body["code"] == "object_owner_conflict"
    assert first.id in error.body["message"] and second.id in error.body["message"]
    assert len(upstream.received) == seen  # refused here, not sent

    store = client.vector_stores.create(name="one", file_ids=[first.id])
    assert client.vector_stores.retrieve(store.id).id == store.id
    client.vector_stores.files.create(vector_store_id=store.id, file_id=first.id)


def test_an_object_made_elsewhere_is_learnt_when_a_key_answers_for_it(keyrotor: Keyrotor, upstream: FakeUpstream):
    kr = keyrotor
    kr.add_keys(*KEYS)
    client_key = kr.add_client("alice")
    kr.setup("clients", "set", "alice", "--legacy-objects")  # objects no client made: reachable by leave only
    kr.start_proxy()
    made = httpx.post(
        upstream.url + "/v1/files",
        headers={"authorization": f"Bearer {KEYS[2]}"},
        files={"file": ("outside.txt", b"made outside")},
        data={"purpose": "assistants"},
    ).json()
    client = client_for(kr, client_key)
    # Tried on the pool as before: the other keys' projects answer 404 until the owner does.
    answers = [raises(lambda: client.files.retrieve(made["id"])) for _ in range(3)]
    assert sum(a is None for a in answers) == 1
    for _ in range(4):
        assert client.files.content(made["id"]).read() == b"made outside"
    wait_for(lambda: stored_owner(kr, made["id"]) == 3, what="the learnt owner stored")


def test_ownership_survives_a_restart(running, upstream: FakeUpstream):
    kr, client_key = running
    client = client_for(kr, client_key)
    uploaded = client.files.create(file=("keep.txt", b"kept"), purpose="assistants")
    owner = upstream.objects.owner_of(uploaded.id)
    wait_for(lambda: stored_owner(kr, uploaded.id) == key_id_of(owner), what="the owner stored")
    kr.stop()
    kr.start_proxy()
    client = client_for(kr, client_key)
    for _ in range(4):
        assert client.files.content(uploaded.id).read() == b"kept"
    assert keys_for(upstream, uploaded.id) == {owner}


def test_the_ui_shows_what_keys_own_and_flows_made(running, upstream: FakeUpstream):
    kr, client_key = running
    client = client_for(kr, client_key)
    uploaded = client.files.create(file=("requests.jsonl", BATCH_INPUT), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    owner = key_id_of(upstream.objects.owner_of(uploaded.id))
    wait_for(lambda: stored_owner(kr, batch.id) == owner, what="the batch's owner stored")
    kr.start_ui()
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}

    listed = {k["id"]: k["objects"] for k in httpx.get(kr.ui_url + "/api/keys", headers=auth).json()["keys"]}
    assert listed == {**dict.fromkeys((1, 2, 3), 0), owner: 3}  # the file, the batch and its output file
    conn = sqlite3.connect(kr.db_path)
    try:
        row_id = conn.execute("SELECT id FROM flows WHERE method = 'POST' AND path = '/v1/batches'").fetchone()[0]
    finally:
        conn.close()
    detail = httpx.get(f"{kr.ui_url}/api/flows/{row_id}", headers=auth).json()
    roles = {(o["id"], o["role"], o["owner_key_id"]) for o in detail["objects"]}
    assert (batch.id, "created", owner) in roles and (uploaded.id, "used", owner) in roles
    page = httpx.get(f"{kr.ui_url}/flows/{row_id}", headers=auth).text
    assert batch.id in page

    deleted = httpx.post(f"{kr.ui_url}/api/keys/{owner}/delete", headers=auth).json()
    assert deleted["owned_objects"] == 3 and "object_owner_unavailable" in deleted["warning"]
    error = refused_with_409(lambda: client.batches.retrieve(batch.id), what="the deleted owner to be refused")
    assert "deleted" in error.body["message"]


@pytest.mark.parametrize(
    ("behaviour", "status", "code", "why"),
    [
        ("ratelimit", 429, "rate_limit_exceeded", "resting"),
        ("invalid", 409, "object_owner_unavailable", "invalid"),
        ("quota", 409, "object_owner_unavailable", "exhausted"),
    ],
)
def test_an_owner_that_fails_is_not_replaced_by_another_key(running, upstream, behaviour, status, code, why):
    kr, client_key = running
    client = client_for(kr, client_key)
    uploaded = client.files.create(file=("notes.txt", b"some notes"), purpose="assistants")
    owner = upstream.objects.owner_of(uploaded.id)
    upstream.set_key(owner, behaviour, retry_after="30")

    error = raises(lambda: client.files.retrieve(uploaded.id))
    assert isinstance(error, openai.APIStatusError) and error.status_code == status
    assert error.body["code"] == code
    assert uploaded.id in error.body["message"] and why in error.body["message"]
    if status == 429:
        assert 20 <= int(error.response.headers["retry-after"]) <= 30
    assert keys_for(upstream, uploaded.id) == {owner}  # no other key was asked for it
