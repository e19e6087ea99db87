"""Access: who may call, checked against client keys held in memory."""

from __future__ import annotations

import json

import pytest
from mitmproxy.test import taddons, tflow, tutils

from addons.access import Access
from addons.runtime import Runtime
from core.credentials import credential_from, hash_client_key
from core.limits import ClientPolicy
from core.metadata import AccessVerdict, RequestedModel
from core.models import Client
from storage import client_keys, db
from tests.conftest import addon_context
from tests.fakes import MemoryBackend, memory_runtime


@pytest.fixture
def issued(database):
    path = database
    conn = db.connect(path)
    alice = client_keys.create_client(conn, "alice")
    bob = client_keys.create_client(conn, "bob")
    client_keys.set_enabled(conn, "bob", False)
    conn.close()
    return path, alice, bob


@pytest.fixture
def access(issued):
    path = issued[0]
    runtime = Runtime()
    addon = Access(state=runtime.state, governor=runtime.governor)
    with addon_context(addon, path, runtime):
        yield addon


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({"authorization": "Bearer kr-abc"}, "kr-abc"),
        ({"authorization": "bearer  kr-abc "}, "kr-abc"),
        ({"api-key": "kr-abc"}, "kr-abc"),
        ({"authorization": "Basic a2V5"}, None),
        ({"authorization": "Bearer "}, None),
        ({}, None),
    ],
)
def test_credential_from(headers, expected):
    assert credential_from(
        tutils.treq(headers=tuple((k.encode(), v.encode()) for k, v in headers.items())).headers.fields
    ) == (expected)


def flow_with(**headers: str) -> tflow.HTTPFlow:
    flow = tflow.tflow()
    for name, value in headers.items():
        flow.request.headers[name.replace("_", "-")] = value
    return flow


def test_issued_key_is_let_through_and_named(access, issued):
    _, alice, _ = issued
    for flow in (flow_with(authorization=f"Bearer {alice}"), flow_with(api_key=alice)):
        access.request(flow)
        assert flow.response is None
        expected = AccessVerdict(client_id=1, client_name="alice", key_id=1, address="127.0.0.1")  # tflow's peer
        assert flow.metadata["keyrotor.access"] == expected


@pytest.mark.parametrize(
    "peer, forwarded, address, passed_on",
    [
        ("10.0.0.5", "203.0.113.7", "203.0.113.7", None),  # the trusted proxy names the client
        ("10.0.0.5", "203.0.113.7, 198.51.100.9", "198.51.100.9", None),  # the client's own claim is further left
        ("10.0.0.5", "198.51.100.9, 10.0.0.4", "198.51.100.9", None),  # a chain of trusted proxies
        ("192.0.2.1", "203.0.113.7", "192.0.2.1", "203.0.113.7"),  # anyone else: ignored and passed on
    ],
)
def test_a_trusted_proxys_forwarded_for_names_the_client(issued, peer, forwarded, address, passed_on):
    path, alice, _ = issued
    runtime = Runtime()
    addon = Access(state=runtime.state, governor=runtime.governor)
    with addon_context(addon, path, runtime) as tctx:
        tctx.configure(addon, access_trusted_proxies="10.0.0.0/24")
        flow = flow_with(authorization=f"Bearer {alice}", x_forwarded_for=forwarded)
        flow.client_conn.peername = (peer, 40000)
        addon.request(flow)
        verdict = AccessVerdict.of(flow.metadata)
        assert verdict is not None and verdict.admitted and verdict.address == address
        assert flow.request.headers.get("x-forwarded-for") == passed_on


@pytest.mark.parametrize(
    "case, code",
    [("missing", "missing_api_key"), ("unknown", "invalid_api_key"), ("disabled", "invalid_api_key")],
)
def test_other_callers_get_an_openai_shaped_401(access, issued, case, code):
    headers = {
        "missing": {},
        "unknown": {"authorization": "Bearer kr-made-up"},
        "disabled": {"authorization": f"Bearer {issued[2]}"},
    }[case]
    flow = flow_with(**headers)
    access.request(flow)
    assert flow.response.status_code == 401
    error = json.loads(flow.response.content)["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]
    assert not flow.metadata["keyrotor.access"].admitted


def test_a_rejection_does_not_echo_the_key(access):
    flow = flow_with(authorization="Bearer kr-this-is-a-guess-1234")
    access.request(flow)
    assert b"kr-this-is-a-guess-1234" not in flow.response.content


def test_the_client_key_is_replaced_as_soon_as_headers_arrive(access, issued):
    _, alice, _ = issued
    flow = flow_with(authorization=f"Bearer {alice}", api_key=alice)
    access.requestheaders(flow)
    assert flow.request.headers["authorization"] == "Bearer [client key #1]"
    assert flow.request.headers["api-key"] == "[client key #1]"
    access.request(flow)
    assert flow.response is None and flow.metadata["keyrotor.access"].client_id == 1


def test_a_refused_credential_is_replaced_and_answered_at_the_headers(access):
    flow = flow_with(authorization="Bearer sk-pool-key-pasted-by-mistake-9876", x_api_key="kr-other", cookie="k=v")
    flow.request.path = "/v1/models?key=kr-guess-in-the-url-5555&limit=1"
    access.requestheaders(flow)
    assert flow.response.status_code == 401  # before the body is read
    assert flow.request.headers["authorization"] == "Bearer [refused key ...9876]"
    assert "x-api-key" not in flow.request.headers and "cookie" not in flow.request.headers
    assert flow.request.path == "/v1/models?limit=1"
    assert "pasted-by-mistake" not in str(flow.get_state()) and "guess-in-the-url" not in str(flow.get_state())


def test_an_issued_key_in_the_query_string_is_let_through_as_a_placeholder(access, issued):
    _, alice, _ = issued
    flow = flow_with()
    flow.request.path = f"/v1/models?api-key={alice}"
    access.requestheaders(flow)
    assert flow.response is None and flow.metadata["keyrotor.access"].client_id == 1
    assert flow.request.path == "/v1/models"
    assert flow.request.headers["authorization"] == "Bearer [client key #1]"


def test_over_in_memory_ports_clients_come_from_the_runtimes_state():
    backend = MemoryBackend()
    backend.clients.clients = {hash_client_key("kr-carol"): (Client(3, "carol"), 9)}
    runtime = memory_runtime(backend)
    addon = Access(state=runtime.state, governor=runtime.governor)
    with taddons.context(addon):
        carol, stranger = flow_with(authorization="Bearer kr-carol"), flow_with(authorization="Bearer kr-dave")
        addon.request(carol)
        addon.request(stranger)
    assert carol.response is None and carol.metadata["keyrotor.access"].key_id == 9
    assert stranger.response.status_code == 401
    assert runtime.governor.counters is backend.counters


def model_request(key: str, body: bytes, content_type: str = "application/json") -> tflow.HTTPFlow:
    flow = flow_with(authorization=f"Bearer {key}", content_type=content_type)
    flow.request.method, flow.request.path, flow.request.content = "POST", "/v1/chat/completions", body
    return flow


def test_the_model_is_read_once_for_every_client_and_shared(access, issued):
    flow = model_request(issued[1], b'{"metadata": {"model": "gpt-4o-mini"}, "model": "gpt-4o"}')
    access.request(flow)
    assert flow.response is None
    assert RequestedModel.of(flow.metadata) == RequestedModel("gpt-4o", "body")  # what the other addons read


@pytest.mark.parametrize(
    "body, code",
    [
        (b'{"model": "gpt-4o-mini", "model": "gpt-4o"}', "ambiguous_model"),
        (b'{"model": ["gpt-4o"]}', "invalid_model"),
    ],
)
def test_a_model_named_ambiguously_is_refused_with_400_before_upstream(access, issued, body, code):
    flow = model_request(issued[1], body)  # alice has no limits: the refusal is for everyone
    access.request(flow)
    assert flow.response is not None and flow.response.status_code == 400
    assert json.loads(flow.response.content)["error"]["code"] == code
    assert flow.response.headers["x-keyrotor-error"] == code
    assert AccessVerdict.of(flow.metadata).rejected == code
    assert RequestedModel.of(flow.metadata) is None


@pytest.mark.parametrize(
    "body, status",
    [
        (b'{"metadata": {"model": "gpt-4o-mini"}, "model": "gpt-4o"}', 403),
        (b'{"messages": [{"role": "user", "content": "hi", "model": "gpt-4o-mini"}], "model": "gpt-4o"}', 403),
        (b'{"metadata": {"model": "gpt-4o"}, "model": "gpt-4o-mini"}', None),
    ],
)
def test_the_allowlist_checks_the_top_level_model_not_a_decoy(body, status):
    backend = MemoryBackend()
    mini_only = Client(3, "carol", ClientPolicy(models=("gpt-4o-mini",)))
    backend.clients.clients = {hash_client_key("kr-carol"): (mini_only, 9)}
    runtime = memory_runtime(backend)
    addon = Access(state=runtime.state, governor=runtime.governor)
    flow = model_request("kr-carol", body)
    with taddons.context(addon):
        addon.request(flow)
    assert (flow.response.status_code if flow.response else None) == status


def test_only_a_pass_s_answer_names_its_flow_and_upstream_cannot_name_another(access):
    from core.passes import FLOW_HEADER

    for by_pass in (True, False):
        flow = tflow.tflow(resp=tutils.tresp(headers=((FLOW_HEADER.encode(), b"someone-else-s-flow"),)))
        flow.metadata["keyrotor.access"] = AccessVerdict(client_id=1, client_name="alice", by_pass=by_pass)
        access.responseheaders(flow)
        access.response(flow)
        if by_pass:
            assert flow.response.headers.get_all(FLOW_HEADER) == [flow.id]
        else:
            assert flow.response.headers.get_all(FLOW_HEADER) == ["someone-else-s-flow"]  # not keyrotor's to name
