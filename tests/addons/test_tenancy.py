"""The tenancy hooks: another client's object is refused before a key is picked, lists are filtered."""

from __future__ import annotations

import json

from mitmproxy.test import tflow, tutils

from addons.tenancy import Tenancy
from addons.tenant_lists import TenantLists
from core.metadata import ACCESS, KEYPOOL, AccessVerdict, KeyUse
from core.models import Client
from core.state import ProxyState
from tests.fakes import MemoryWriter

ALICE, BOB = 1, 2


def state_with_objects() -> ProxyState:
    state = ProxyState()
    state.owners.update({"file-a": 1, "file-b": 1, "file-old": 1})
    state.tenants.update({"file-a": ALICE, "file-b": BOB})
    state.clients_by_id = {ALICE: Client(ALICE, "alice"), BOB: Client(BOB, "bob")}
    return state


def flow_of(client_id: int | None, method: str, path: str, body: bytes = b"") -> tflow.HTTPFlow:
    flow = tflow.tflow()
    flow.request.method, flow.request.path, flow.request.content = method, path, body
    if client_id is not None:
        flow.metadata[ACCESS] = AccessVerdict(client_id=client_id, client_name={ALICE: "alice", BOB: "bob"}[client_id])
    return flow


def test_another_clients_object_is_refused_as_upstream_would_and_audited():
    writer = MemoryWriter()
    tenancy = Tenancy(state_with_objects(), writer)
    flow = flow_of(BOB, "POST", "/v1/responses", b'{"model": "m", "input": [{"file_id": "file-a"}]}')
    assert tenancy.request(flow) is None
    assert flow.response is not None and flow.response.status_code == 404
    assert json.loads(flow.response.content)["error"]["message"] == "No such File object: file-a"
    assert "x-keyrotor-error" not in flow.response.headers
    use = KeyUse.of(flow.metadata)
    assert use is not None and use.key_id is None and use.refusal and use.refusal.startswith("object_not_found")
    [refusal] = writer.refusals
    assert (refusal.client_id, refusal.client_name, refusal.object_ids, refusal.flow_id) == (
        BOB,
        "bob",
        ("file-a",),
        flow.id,
    )


def test_own_objects_and_requests_without_a_client_pass():
    writer = MemoryWriter()
    tenancy = Tenancy(state_with_objects(), writer)
    for flow in (
        flow_of(ALICE, "GET", "/v1/files/file-a/content"),
        flow_of(BOB, "DELETE", "/v1/files/file-b"),
        flow_of(None, "GET", "/v1/files/file-a"),  # no client keys: no tenants
        flow_of(BOB, "POST", "/v1/chat/completions", b'{"model": "m", "messages": []}'),
    ):
        assert tenancy.request(flow) is None
        assert flow.response is None
    assert writer.refusals == []


def test_objects_of_no_client_need_leave():
    state = state_with_objects()
    assert Tenancy(state).request(flow := flow_of(ALICE, "GET", "/v1/files/file-old")) is None
    assert flow.response is not None and flow.response.status_code == 404
    state.clients_by_id[ALICE] = Client(ALICE, "alice", legacy_objects=True)
    assert Tenancy(state).request(flow := flow_of(ALICE, "GET", "/v1/files/file-old")) is None
    assert flow.response is None
    assert Tenancy(state).request(flow := flow_of(ALICE, "GET", "/v1/files/file-b")) is None
    assert flow.response is not None and flow.response.status_code == 404  # leave is not for others' objects


def test_a_list_shows_the_caller_only_its_own():
    lists = TenantLists(state_with_objects())
    flow = flow_of(BOB, "GET", "/v1/files?limit=10")
    flow.metadata[KEYPOOL] = KeyUse(key_id=1)
    data = [{"id": i, "object": "file"} for i in ("file-a", "file-b", "file-old")]
    body = {"object": "list", "data": data, "first_id": "file-a", "last_id": "file-old", "has_more": False}
    flow.response = tutils.tresp(status_code=200, content=json.dumps(body).encode())
    assert lists.response(flow) is None
    shown = json.loads(flow.response.content)
    assert [i["id"] for i in shown["data"]] == ["file-b"]
    assert (shown["first_id"], shown["last_id"], shown["has_more"]) == ("file-b", "file-b", False)
