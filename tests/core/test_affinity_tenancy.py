"""Tenancy's pure decisions (core/affinity.py): whose objects a client may name, what a refusal
looks like, what an answer's new objects belong to, and how a list is filtered and paged."""

from __future__ import annotations

import json

import pytest

from core import affinity
from core.affinity import OwnedObject
from core.models import Client
from core.state import ProxyState

ALICE, BOB = 1, 2
TENANTS = {"file-a": ALICE, "resp_a": ALICE, "file-b": BOB}  # file-old: nobody's (made before)


@pytest.mark.parametrize(
    ("referenced", "client", "legacy", "foreign"),
    [
        (("file-a", "resp_a"), ALICE, False, ()),
        (("file-a",), BOB, False, ("file-a",)),
        (("file-a",), BOB, True, ("file-a",)),  # leave for legacy objects is not leave for others'
        (("file-b", "file-a"), BOB, False, ("file-a",)),
        (("file-old",), ALICE, False, ("file-old",)),  # made upstream directly, or before tenancy
        (("file-old",), ALICE, True, ()),
        (("file-unheard-of",), ALICE, False, ("file-unheard-of",)),
    ],
)
def test_a_client_names_only_its_own_objects(referenced, client, legacy, foreign):
    assert affinity.foreign_ids(referenced, client, TENANTS, legacy) == foreign
    assert all(affinity.visible_to(i, client, TENANTS, legacy) == (i not in foreign) for i in referenced)


@pytest.mark.parametrize(
    ("path", "body", "status", "message", "param", "code"),
    [
        ("/v1/files/file-a", None, 404, "No such File object: file-a", "id", None),
        ("/v1/files/file-a/content", None, 404, "No such File object: file-a", "id", None),
        ("/v1/batches/batch_a/cancel", None, 404, "No batch found with id 'batch_a'.", "batch_id", None),
        ("/v1/responses/resp_a", None, 404, "Response with id 'resp_a' not found.", None, None),
        ("/v1/vector_stores/vs_a", None, 404, "No vector store found with id 'vs_a'.", None, None),
        ("/v1/assistants/asst_a", None, 404, "No assistant found with id 'asst_a'.", None, None),
        ("/v1/threads/thread_a/runs", None, 404, "No thread found with id 'thread_a'.", None, None),
        (
            "/v1/responses",
            {"model": "m", "previous_response_id": "resp_a"},
            404,
            "Previous response with id 'resp_a' not found.",
            "previous_response_id",
            "previous_response_not_found",
        ),
        (
            "/v1/batches",
            {"input_file_id": "file-a", "endpoint": "/v1/chat/completions"},
            400,
            "Invalid 'input_file_id': 'file-a'. File with ID 'file-a' does not exist.",
            "input_file_id",
            None,
        ),
        ("/v1/vector_stores", {"file_ids": ["file-b", "file-a"]}, 404, "No such File object: file-a", "file_ids", None),
        ("/v1/vector_stores/vs_b/files", {"file_id": "file-a"}, 404, "No such File object: file-a", "file_id", None),
        (
            "/v1/responses",
            {"tools": [{"type": "file_search", "vector_store_ids": ["vs_a"]}]},
            404,
            "No vector store found with id 'vs_a'.",
            "vector_store_ids",
            None,
        ),
    ],
)
def test_a_refusal_is_upstreams_own_not_found(path, body, status, message, param, code):
    raw = json.dumps(body).encode() if body is not None else None
    foreign = next(i for i in affinity.referenced_ids(path, raw) if i.endswith("_a") or i.endswith("-a"))
    answer = affinity.not_found(foreign, path, raw)
    assert (answer.status, json.loads(answer.body())) == (
        status,
        {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}},
    )
    assert answer.headers() == {"content-type": "application/json"}  # no keyrotor header: no hint


def test_what_a_client_makes_is_its_own():
    made = affinity.learnt("f", 1, "POST", ("file-a",), [OwnedObject("batch_1", "batch")], ALICE, own=True)
    assert made is not None
    assert made.client_of("batch_1") == ALICE
    assert made.client_of("file-a") is None  # named, not made here: it keeps whoever made it

    # A read of the client's own batch shows its output file for the first time: the client's too.
    own = affinity.derives_from_own(("batch_1",), ALICE, {"batch_1": ALICE})
    shown = [OwnedObject("batch_1", "batch"), OwnedObject("file-out", "file")]
    read = affinity.learnt("f", 1, "GET", ("batch_1",), shown, ALICE, own)
    assert read is not None and read.client_of("file-out") == ALICE

    # A legacy batch read by a client with leave: what it shows stays nobody's.
    assert not affinity.derives_from_own(("batch_old",), ALICE, {})
    read = affinity.learnt("f", 1, "GET", ("batch_old",), [OwnedObject("file-x", "file")], ALICE, False)
    assert read is not None and read.client_of("file-x") is None
    # A list shows objects keyrotor may not have seen made: nobody's.
    listed = affinity.learnt("f", 1, "GET", (), [OwnedObject("file-y", "file")], ALICE, False)
    assert listed is not None and listed.client_of("file-y") is None
    # No client (no access control): nobody's.
    anonymous = affinity.learnt("f", 1, "POST", (), [OwnedObject("file-z", "file")])
    assert anonymous is not None and anonymous.client_of("file-z") is None


def test_the_state_learns_clients_and_leave():
    state = ProxyState()
    state.learn(
        affinity.Ownership(
            "f",
            3,
            (OwnedObject("file-a", "file"),),
            (),
            (OwnedObject("file-old", "file"),),
            ALICE,
            frozenset({"file-a"}),
        )
    )
    assert state.owners == {"file-a": 3, "file-old": 3}
    assert state.tenants == {"file-a": ALICE}
    state.learn(affinity.Ownership("g", 4, (OwnedObject("file-a", "file"),), (), (), BOB, frozenset({"file-a"})))
    assert state.tenants == {"file-a": ALICE}  # the first maker stays
    state.clients_by_id = {ALICE: Client(ALICE, "alice"), BOB: Client(BOB, "bob", legacy_objects=True)}
    assert not state.legacy_allowed(ALICE) and state.legacy_allowed(BOB) and not state.legacy_allowed(99)


@pytest.mark.parametrize(
    ("method", "path", "listed"),
    [
        ("GET", "/v1/files", True),
        ("GET", "/v1/files?limit=5&after=file-1", True),
        ("GET", "/v1/vector_stores/", True),
        ("GET", "/v1/fine_tuning/jobs", True),
        ("POST", "/v1/files", False),
        ("GET", "/v1/files/file-1", False),
        ("GET", "/v1/vector_stores/vs_1/files", False),  # inside an object the caller may reach: all its own
        ("GET", "/v1/models", False),
    ],
)
def test_which_answers_are_lists_to_filter(method, path, listed):
    assert affinity.is_list(method, path) == listed


def page(ids: list[str], has_more: bool) -> bytes:
    data = [{"id": i, "object": "file"} for i in ids]
    first, last = (ids[0], ids[-1]) if ids else (None, None)
    return json.dumps(
        {"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": has_more}
    ).encode()


def test_a_list_keeps_the_callers_and_says_where_upstream_stopped():
    mine = {"file-1", "file-3", "file-5"}.__contains__
    filtered = affinity.filtered_page(page(["file-1", "file-2", "file-3", "file-4"], True), mine)
    assert filtered is not None
    assert [i["id"] for i in filtered.value["data"]] == ["file-1", "file-3"]
    assert (filtered.value["first_id"], filtered.value["last_id"], filtered.value["has_more"]) == (
        "file-1",
        "file-3",
        True,
    )
    assert filtered.upstream_last == "file-4"  # the next page starts after what upstream showed, not what we kept
    assert affinity.filtered_page(b'{"error": {}}', mine) is None
    assert affinity.filtered_page(b"not json", mine) is None

    # A page filtered to nothing while upstream has more: fetched on, the next page merged in.
    empty = affinity.filtered_page(page(["file-2", "file-4"], True), mine)
    assert empty is not None and empty.value["data"] == [] and empty.value["last_id"] is None
    more = affinity.filtered_page(page(["file-5", "file-6", "file-7"], False), mine)
    assert more is not None
    merged = affinity.merged_page(empty, more)
    assert [i["id"] for i in merged.value["data"]] == ["file-5"] and not merged.has_more

    # More than the client asked for: cut, and the rest is on the next page.
    many = affinity.filtered_page(page(["file-1", "file-3", "file-5"], False), mine)
    assert many is not None
    cut = affinity.truncated(many, 2)
    assert [i["id"] for i in cut.value["data"]] == ["file-1", "file-3"]
    assert (cut.value["last_id"], cut.value["has_more"]) == ("file-3", True)
    assert affinity.truncated(many, None) is many and affinity.truncated(many, 3) is many


def test_the_next_page_asks_from_upstreams_last_id():
    query = [("limit", "2"), ("order", "asc"), ("after", "file-0"), ("purpose", "batch")]
    assert affinity.next_page_query(query, "file-9") == [
        ("order", "asc"),
        ("purpose", "batch"),
        ("after", "file-9"),
        ("limit", str(affinity.FOLLOW_UP_LIMIT)),
    ]


@pytest.mark.parametrize(
    ("path", "body", "ids"),
    [
        ("/v1/responses", {"model": "m", "conversation": "conv_a"}, ("conv_a",)),
        ("/v1/responses", {"model": "m", "conversation": {"id": "conv_a"}}, ("conv_a",)),
        ("/v1/conversations/conv_a/items", None, ("conv_a",)),
        ("/v1/chat/completions", {"model": "m", "conversation": "conv_a"}, ()),  # not a Responses field there
    ],
)
def test_a_conversation_is_named_in_the_path_or_a_responses_body(path, body, ids):
    raw = json.dumps(body).encode() if body is not None else None
    assert affinity.referenced_ids(path, raw) == ids
    if ids:
        refusal = json.loads(affinity.not_found("conv_a", path, raw).body())["error"]
        assert refusal["message"] == "Conversation with id 'conv_a' not found."
