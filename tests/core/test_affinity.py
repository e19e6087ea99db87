"""Key affinity's pure decisions: which ids a request names, who owns them, what an answer teaches."""

from __future__ import annotations

import json

import pytest

from core import affinity
from core.affinity import OwnedObject
from core.models import KeyState, PoolKey
from core.pool import Pool


@pytest.mark.parametrize(
    ("path", "ids"),
    [
        ("/v1/files/file-1/content", ["file-1"]),
        ("/v1/batches/batch_1", ["batch_1"]),
        ("/v1/responses/resp_1/input_items?limit=5", ["resp_1"]),
        ("/v1/vector_stores/vs_1/files/file-2", ["vs_1", "file-2"]),
        ("/v1/threads/thread_1/runs/run_2/steps", ["thread_1", "run_2"]),
        ("/v1/threads/thread_1/messages", ["thread_1"]),
        ("/v1/threads/runs", []),
        ("/v1/fine_tuning/jobs/ftjob-1/events", ["ftjob-1"]),
        ("/v1/uploads/upload_1/parts", ["upload_1"]),
        ("/v1/files", []),
        ("/v1/chat/completions", []),
    ],
)
def test_ids_in_paths(path, ids):
    assert affinity.path_ids(path) == ids


def test_ids_in_bodies_at_any_depth():
    body = {
        "model": "gpt-4o",
        "previous_response_id": "resp_1",
        "tools": [{"type": "file_search", "vector_store_ids": ["vs_1", "vs_2"]}],
        "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}],
        "training_file": "file-2",
    }
    assert affinity.body_ids(json.dumps(body).encode()) == ["resp_1", "vs_1", "vs_2", "file-1", "file-2"]


@pytest.mark.parametrize(
    "body",
    [b"", b'{"model": "gpt-4o", "messages": []}', b"--boundary\r\n...custom_id...", b'{"thread_id": '],
)
def test_bodies_that_name_nothing(body):
    assert affinity.body_ids(body) == []


def test_referenced_ids_are_each_named_once():
    body = b'{"input_file_id": "file-1", "metadata": {"file_id": "file-1"}}'
    assert affinity.referenced_ids("/v1/files/file-1", body) == ("file-1",)


def test_resolving_owners():
    owners = {"file-1": 1, "file-2": 2, "resp_1": 1}
    one = affinity.resolve(("file-1", "resp_1", "file-9"), owners)
    assert (one.owner, one.owned, one.conflict) == (1, ("file-1", "resp_1"), False)
    two = affinity.resolve(("file-1", "file-2"), owners)
    assert two.conflict and two.owner is None
    assert affinity.resolve(("file-9",), owners).owners == {}


def test_what_an_answer_shows():
    batch = {"id": "batch_1", "object": "batch", "input_file_id": "file-1", "output_file_id": "file-2"}
    assert affinity.created_objects(json.dumps(batch).encode()) == [
        OwnedObject("batch_1", "batch"),
        OwnedObject("file-1", "file"),
        OwnedObject("file-2", "file"),
    ]
    listing = {"object": "list", "data": [{"id": "vs_1", "object": "vector_store"}]}
    assert affinity.created_objects(json.dumps(listing).encode()) == [OwnedObject("vs_1", "vector_store")]
    assert affinity.created_objects(b'{"id": "chatcmpl-1", "object": "chat.completion"}') == []
    assert affinity.created_objects(b"not json") == []


def test_a_streams_final_event():
    completed = b'event: response.completed\ndata: {"type": "response.completed", "response": {"id": "resp_1", "object": "response"}}\n\n'
    delta = b'event: response.output_text.delta\ndata: {"type": "response.output_text.delta", "delta": "resp_"}\n\n'
    assert affinity.is_final_event(completed) and not affinity.is_final_event(delta)
    assert affinity.streamed_objects(completed) == [OwnedObject("resp_1", "response")]
    bare = b'data: {"type":"response.completed","response":{"id":"resp_2","object":"response"}}\n\n'
    assert affinity.is_final_event(bare)


def test_what_an_answer_teaches():
    made = affinity.learnt(
        "f1", 2, "POST", ("file-1",), [OwnedObject("batch_1", "batch"), OwnedObject("file-1", "file")]
    )
    assert made.created == (OwnedObject("batch_1", "batch"),)
    assert made.used == ("file-1",) and made.answered == (OwnedObject("file-1", "file"),)
    read = affinity.learnt("f2", 2, "GET", ("batch_1",), [OwnedObject("file-3", "file")])
    assert read.created == () and {o.id for o in read.owned} == {"batch_1", "file-3"}
    assert affinity.learnt("f3", 2, "GET", (), []) is None


def test_refusals_name_the_objects_and_why():
    gone = affinity.owner_unavailable(("file-1",), 3, "is disabled")
    assert (gone.status, gone.code) == (409, "object_owner_unavailable")
    assert "file-1" in gone.message and "#3" in gone.message and "disabled" in gone.message
    both = affinity.owners_conflict(affinity.resolve(("file-1", "file-2"), {"file-1": 1, "file-2": 2}))
    assert (both.status, both.code) == (409, "object_owner_conflict")
    limited = affinity.owner_resting(("resp_1",), 1, 2.2, "429 rate_limit_exceeded")
    assert (limited.status, limited.headers["retry-after"]) == (429, "3")
    cooling = affinity.owner_resting(("resp_1",), 1, 10, "circuit open: 500 server_error")
    assert (cooling.status, cooling.code, cooling.headers["retry-after"]) == (503, "object_owner_cooling", "10")


def key(n: int, state: KeyState = KeyState.ACTIVE) -> PoolKey:
    return PoolKey(n, f"sk-{n}", f"{n:04d}", state, None, None, 1.0, 0)


def test_the_pool_gives_the_owner_or_nobody():
    pool = Pool()
    pool.replace_keys([key(1), key(2), key(3, KeyState.DISABLED)])
    assert [pool.pick("round_robin", 0, only=2).id for _ in range(3)] == [2, 2, 2]
    assert pool.pick("round_robin", 0, frozenset({2}), only=2).id == 2  # a retry stays with the owner
    assert pool.pick("round_robin", 0, only=3) is None  # never another key instead
    assert pool.pick("round_robin", 0, only=9) is None


@pytest.mark.parametrize(
    ("body", "may"),
    [
        (b'{"previous_response_id": "resp_1"}', True),
        (b'{"tools": [{"vector_store_ids": ["vs_1"]}]}', True),
        (b'{"training_file" : "file-1"}', True),
        (b'{"messages": [{"role": "tool", "tool_call_id": "call_1"}], "max_tokens": 5}', False),
        (b'{"image_url": {"url": "data:image/png;base64,' + b"A" * 100_000 + b'"}}', False),
        (b'{"content": "' + b"a_b " * 1000 + b'", "thread_id": "thread_1"}', True),  # many underscores
    ],
)
def test_which_bodies_are_worth_parsing(body, may):
    assert affinity.may_name_objects(body) is may


def test_a_watched_stream_keeps_the_objects_its_final_event_shows_and_passes_every_byte_on():
    watch = affinity.ObjectWatch()
    final = {"type": "response.completed", "response": {"id": "resp_1", "object": "response"}}
    event = b"event: response.completed\ndata: " + json.dumps(final).encode() + b"\n\n"
    chunks = [b"event: response.created\ndata: {}\n\n", event[:20], event[20:], b""]
    assert [watch(chunk) for chunk in chunks] == chunks
    assert [o.id for o in watch.objects] == ["resp_1"]


@pytest.mark.parametrize(
    ("path", "status", "content_type", "watched"),
    [
        ("/v1/responses", 200, "text/event-stream", True),
        ("/v1/responses", 400, "text/event-stream", False),
        ("/v1/responses", 200, "application/json", False),
        ("/v1/chat/completions", 200, "text/event-stream", False),
    ],
)
def test_which_streams_are_watched(path, status, content_type, watched):
    assert affinity.watches_stream(path, status, {"content-type": content_type}) is watched


def test_an_answer_shows_its_streams_objects_else_its_json_bodys():
    made = OwnedObject("file-1", "file")
    body = json.dumps({"id": "file-1", "object": "file"}).encode()
    assert affinity.shown_objects([made], {"content-type": "text/event-stream"}, lambda: b"") == [made]
    assert [o.id for o in affinity.shown_objects(None, {"content-type": "application/json"}, lambda: body)] == [
        "file-1"
    ]
    assert affinity.shown_objects(None, {"content-type": "text/plain"}, lambda: body) == []

    def undecodable() -> bytes:
        raise ValueError("unknown content-encoding")

    assert affinity.shown_objects(None, {"content-type": "application/json"}, undecodable) == []
