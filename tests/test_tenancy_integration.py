"""Tenancy end to end: two clients on ONE shared upstream key cannot reach each other's objects.

The fake upstream keeps files, batches, stored responses and vector stores per upstream key, as
OpenAI keeps them per project: on one shared key, upstream itself would let client B see
everything of client A. keyrotor must answer B as upstream answers an id it does not hold, send
nothing upstream for it, and list only B's own.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable

import httpx
import openai
import pytest

from tests.conftest import Keyrotor, batch_input, raises, wait_for
from tests.fake_upstream import FakeUpstream

KEY = "sk-good-tenancy-shared-aaaaaaaaaaaaaaaaaaaa0001"
BATCH_INPUT = batch_input(2)


def client_for(kr: Keyrotor, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=kr.base_url, api_key=key, max_retries=0, timeout=30)


@pytest.fixture
def tenants(keyrotor: Keyrotor) -> tuple[Keyrotor, openai.OpenAI, openai.OpenAI]:
    keyrotor.add_keys(KEY)
    alice = keyrotor.add_client("alice")
    bob = keyrotor.add_client("bob")
    keyrotor.start_proxy()
    return keyrotor, client_for(keyrotor, alice), client_for(keyrotor, bob)


def upstream_error(upstream: FakeUpstream, method: str, path: str, **kwargs) -> tuple[int, dict]:
    """What upstream itself answers the shared key for `path` (an id it does not hold)."""
    answer = httpx.request(method, upstream.url + path, headers={"authorization": f"Bearer {KEY}"}, **kwargs)
    return answer.status_code, answer.json()


def test_another_clients_objects_cannot_be_listed_read_used_changed_or_deleted(tenants, upstream: FakeUpstream):
    kr, alice, bob = tenants
    file = alice.files.create(file=("requests.jsonl", BATCH_INPUT), purpose="batch")
    batch = alice.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    response = alice.responses.create(model="gpt-4o-mini", input="a secret plan")
    store = alice.vector_stores.create(name="alice's", file_ids=[file.id])
    bobs_store = bob.vector_stores.create(name="bob's")
    conversation = alice.conversations.create(metadata={"topic": "plans"})
    alices = {file.id, batch.id, response.id, store.id, batch.output_file_id, conversation.id}

    def listed(page) -> list[str]:
        return [item.id for item in page]

    attempts: dict[str, Callable[[], object]] = {
        "files.list": lambda: listed(bob.files.list()),
        "files.retrieve": lambda: bob.files.retrieve(file.id),
        "files.content": lambda: bob.files.content(file.id).read(),
        "files.content (batch output)": lambda: bob.files.content(batch.output_file_id).read(),
        "files.delete": lambda: bob.files.delete(file.id),
        "batches.list": lambda: listed(bob.batches.list()),
        "batches.retrieve": lambda: bob.batches.retrieve(batch.id),
        "batches.cancel": lambda: bob.batches.cancel(batch.id),
        "batches.create (A's input file)": lambda: bob.batches.create(
            input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
        "responses.retrieve": lambda: bob.responses.retrieve(response.id),
        "responses.create (previous_response_id)": lambda: bob.responses.create(
            model="gpt-4o-mini", input="go on", previous_response_id=response.id
        ),
        "responses.delete": lambda: bob.responses.delete(response.id),
        "conversations.retrieve": lambda: bob.conversations.retrieve(conversation.id),
        "conversations.update": lambda: bob.conversations.update(conversation.id, metadata={"topic": "mine"}),
        "conversations.delete": lambda: bob.conversations.delete(conversation.id),
        "responses.create (conversation)": lambda: bob.responses.create(
            model="gpt-4o-mini", input="go on", conversation=conversation.id
        ),
        "vector_stores.list": lambda: listed(bob.vector_stores.list()),
        "vector_stores.retrieve": lambda: bob.vector_stores.retrieve(store.id),
        "vector_stores.update": lambda: bob.vector_stores.update(store.id, name="bob's now"),
        "vector_stores.delete": lambda: bob.vector_stores.delete(store.id),
        "vector_stores.create (A's file)": lambda: bob.vector_stores.create(name="x", file_ids=[file.id]),
        "vector_stores.files.create (A's file in B's store)": lambda: bob.vector_stores.files.create(
            vector_store_id=bobs_store.id, file_id=file.id
        ),
    }
    seen = len(upstream.received)
    answered: dict[str, object] = {}
    leaked = []
    for name, attempt in attempts.items():
        try:
            value = attempt()
        except openai.APIStatusError as e:
            answered[name] = e
            continue
        if name.endswith(".list") and isinstance(value, list) and not alices & set(value):
            answered[name] = value  # a 200 that shows nothing of A's
            continue
        leaked.append(name)
    print(f"\ncross-tenant requests answered 200: {len(leaked)} of {len(attempts)} {leaked}")
    assert leaked == []

    # Refused as upstream refuses an id its project does not hold, word for word.
    missing = "file-" + "0" * 24
    status, shape = upstream_error(upstream, "GET", f"/v1/files/{missing}")
    error = answered["files.retrieve"]
    assert isinstance(error, openai.NotFoundError)
    assert error.body == json.loads(json.dumps(shape["error"]).replace(missing, file.id))
    assert "x-keyrotor-error" not in error.response.headers  # nothing says keyrotor answered
    status, shape = upstream_error(upstream, "GET", "/v1/batches/batch_none")
    assert answered["batches.retrieve"].body == json.loads(json.dumps(shape["error"]).replace("batch_none", batch.id))
    status, shape = upstream_error(upstream, "GET", "/v1/conversations/conv_none")
    assert answered["conversations.retrieve"].body == json.loads(
        json.dumps(shape["error"]).replace("conv_none", conversation.id)
    )
    status, shape = upstream_error(
        upstream, "POST", "/v1/responses", json={"model": "gpt-4o-mini", "input": "x", "conversation": "conv_none"}
    )
    assert answered["responses.create (conversation)"].body == json.loads(
        json.dumps(shape["error"]).replace("conv_none", conversation.id)
    )
    status, shape = upstream_error(upstream, "GET", "/v1/vector_stores/vs_none")
    assert answered["vector_stores.update"].body == json.loads(json.dumps(shape["error"]).replace("vs_none", store.id))
    status, shape = upstream_error(
        upstream, "POST", "/v1/responses", json={"model": "gpt-4o-mini", "input": "x", "previous_response_id": "resp_0"}
    )
    assert answered["responses.create (previous_response_id)"].body == json.loads(
        json.dumps(shape["error"]).replace("resp_0", response.id)
    )
    status, shape = upstream_error(
        upstream,
        "POST",
        "/v1/batches",
        json={"input_file_id": missing, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    )
    refused = answered["batches.create (A's input file)"]
    assert isinstance(refused, openai.APIStatusError) and refused.status_code == status
    assert refused.body == json.loads(json.dumps(shape["error"]).replace(missing, file.id))
    # Nothing named A's objects upstream: only the lists went (and were filtered).
    sent = upstream.received[seen:]
    assert all(not any(i in r.path or i.encode() in r.body for i in alices) for r in sent), [r.path for r in sent]

    # A's objects are all there, and A still reaches them.
    assert alice.files.content(file.id).read() == BATCH_INPUT
    assert alice.batches.retrieve(batch.id).status == "completed"
    assert alice.responses.create(model="gpt-4o-mini", input="go on", previous_response_id=response.id).id
    assert alice.vector_stores.retrieve(store.id).name == "alice's"
    assert alice.conversations.retrieve(conversation.id).metadata == {"topic": "plans"}
    assert alice.responses.create(model="gpt-4o-mini", input="go on", conversation=conversation.id).id
    assert {file.id, batch.output_file_id} <= {f.id for f in alice.files.list()}
    assert [s.id for s in alice.vector_stores.list()] == [store.id]
    assert alice.files.delete(file.id).deleted  # deleting is the owner's

    # The audit log has each refusal, with the client and the object.
    def refusals() -> list[dict]:
        rows = kr.query("SELECT target, changes FROM audit_log WHERE action = 'objects.refused' ORDER BY id")
        return [json.loads(row["changes"]) for row in rows]

    wait_for(lambda: len(refusals()) >= len(attempts) - 3, what="the refusals in the audit log")
    assert {r["client"] for r in refusals()} == {"bob"}
    assert {o for r in refusals() for o in r["objects"]} == alices
    stored = dict(
        sqlite3.connect(kr.db_path).execute(
            "SELECT o.object_id, c.name FROM object_owners o LEFT JOIN clients c ON c.id = o.client_id"
        )
    )
    assert all(stored[i] == "alice" for i in alices)
    assert stored[bobs_store.id] == "bob"


def test_lists_page_through_only_the_callers_objects(tenants):
    _, alice, bob = tenants
    bobs = [bob.files.create(file=(f"b{n}.txt", b"b"), purpose="assistants").id for n in range(2)]
    alices = [alice.files.create(file=(f"a{n}.txt", b"a"), purpose="assistants").id for n in range(25)]
    bobs.append(bob.files.create(file=("b2.txt", b"b"), purpose="assistants").id)

    # Pages of 5: the SDK pages on from each page's last item.
    assert sorted(f.id for f in alice.files.list(limit=5)) == sorted(alices)
    # Bob's newest is on upstream's first page; his two older ones come after 25 of Alice's, on
    # pages that filter to nothing: they are fetched on until his appear.
    first = bob.files.list(limit=2)
    assert [f.id for f in first.data] == [bobs[2]] and first.has_more  # the rest of the page was Alice's
    assert [f.id for f in bob.files.list(limit=2)] == list(reversed(bobs))
    assert [f.id for f in bob.files.list(limit=1)] == list(reversed(bobs))
    assert [f.id for f in bob.files.list(limit=5, order="asc")] == bobs


def test_objects_made_elsewhere_need_the_admins_leave(tenants, upstream: FakeUpstream):
    kr, alice, bob = tenants
    made = httpx.post(
        upstream.url + "/v1/files",
        headers={"authorization": f"Bearer {KEY}"},
        files={"file": ("outside.txt", b"made outside")},
        data={"purpose": "assistants"},
    ).json()["id"]
    seen = len(upstream.received)
    error = raises(lambda: bob.files.retrieve(made))
    assert isinstance(error, openai.NotFoundError)
    assert made not in [f.id for f in bob.files.list()]
    assert len([r for r in upstream.received[seen:] if made in r.path]) == 0

    kr.setup("clients", "set", "bob", "--legacy-objects")
    wait_for(lambda: raises(lambda: bob.files.retrieve(made)) is None, what="bob allowed objects of no client")
    assert bob.files.content(made).read() == b"made outside"
    assert made in [f.id for f in bob.files.list()]
    assert isinstance(raises(lambda: alice.files.retrieve(made)), openai.NotFoundError)  # alice was not allowed
    assert made not in [f.id for f in alice.files.list()]

    kr.setup("clients", "set", "bob", "--no-legacy-objects")
    wait_for(lambda: isinstance(raises(lambda: bob.files.retrieve(made)), openai.NotFoundError), what="leave taken")
    audit = kr.query("SELECT changes FROM audit_log WHERE action = 'clients.set' AND target = 'bob'")
    assert [json.loads(r["changes"])["legacy_objects"]["to"] for r in audit] == [True, False]
