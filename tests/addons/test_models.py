"""GET /v1/models: answered from the route table, or upstream's list with the groups' models added."""

from __future__ import annotations

import json

import pytest
from mitmproxy import flow as mitmproxy_flow
from mitmproxy.test import taddons, tflow, tutils

from addons.credential_sender import CredentialSender
from addons.keypool import KeyPool
from addons.models import Models
from addons.models_merge import ModelsMerge
from core.metadata import KeyUse
from core.routing import DEFAULT, Dialect, Group, Upstream
from tests.fakes import MemoryBackend, default_group, memory_runtime, pool_key

RELAY = Upstream(id=2, name="relay", base_url="http://relay.test", dialect=Dialect.OPENAI, api_version=None)
UPSTREAM_LIST = json.dumps({"object": "list", "data": [{"id": "gpt-4o", "object": "model"}]}).encode()


def runtime_with(*groups: Group):
    backend = MemoryBackend()
    backend.routes.groups = list(groups)
    backend.keys.keys = [pool_key(1, "sk-memory-default-aaaaaaaa-0001", 1), pool_key(2, "sk-memory-relay-0002", 2)]
    return memory_runtime(backend)


def models_request(path: str = "/v1/models") -> tflow.HTTPFlow:
    flow = tflow.tflow()
    flow.request.method, flow.request.path = "GET", path
    flow.request.headers["authorization"] = "Bearer kr-client"
    return flow


def listed(flow: tflow.HTTPFlow) -> list[str]:
    return [m["id"] for m in json.loads(flow.response.content)["data"]]


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models?limit=5"])
def test_the_groups_models_are_answered_without_a_key(path):
    runtime = runtime_with(
        default_group(models={"gpt-4o": None, "fast": "gpt-4o-mini"}),
        Group(id=2, upstream=RELAY, name=DEFAULT, models={"llama-3": None, "gpt-4o": None}),
    )
    flow = models_request(path)
    Models(runtime.state).request(flow)
    assert flow.response.status_code == 200 and flow.response.headers["content-type"] == "application/json"
    assert listed(flow) == ["fast", "gpt-4o", "llama-3"]  # each once
    assert all(m["owned_by"] == "keyrotor" for m in json.loads(flow.response.content)["data"])
    assert KeyUse.of(flow.metadata) is None


@pytest.mark.parametrize(
    "case",
    ["trivial table", "answered already", "another path", "a POST"],
)
def test_other_requests_are_left_to_the_key_pool(case):
    runtime = (
        runtime_with(default_group()) if case == "trivial table" else runtime_with(default_group(models={"a": None}))
    )
    flow = models_request("/v1/models/gpt-4o" if case == "another path" else "/v1/models")
    if case == "answered already":
        flow.response = tutils.tresp(status_code=401)
    if case == "a POST":
        flow.request.method = "POST"
    before = flow.response
    Models(runtime.state).request(flow)
    assert flow.response is before and not flow.metadata


def merging_runtime():
    # The default group serves every model (only upstream knows which); the relay lists its own.
    return runtime_with(default_group(), Group(id=2, upstream=RELAY, name=DEFAULT, models={"llama-3": None}))


def test_a_group_serving_every_model_asks_upstream_and_adds_ours():
    runtime = merging_runtime()
    models, merge = Models(runtime.state), ModelsMerge(runtime.state)
    pool = KeyPool(sender=CredentialSender(), state=runtime.state, writer=runtime.writer)
    with taddons.context(pool) as tctx:
        tctx.configure(pool, keypool_max_attempts=1, keypool_wait_max_seconds=0)
        flow = models_request()
        models.request(flow)
        assert flow.response is None
        assert pool.request(flow) is None  # on to upstream, with the default group's key
        assert flow.request.headers["authorization"] == "Bearer sk-memory-default-aaaaaaaa-0001"
        flow.response = tutils.tresp(content=UPSTREAM_LIST, headers=((b"content-type", b"application/json"),))
        assert pool.response(flow) is None
        merge.response(flow)
    assert listed(flow) == ["gpt-4o", "llama-3"]
    merge.response(flow)  # a later hook of the same flow (a response after an error): added once
    assert listed(flow) == ["gpt-4o", "llama-3"]


@pytest.mark.parametrize("status", [401, 500])
def test_upstreams_failure_is_left_as_it_is(status):
    runtime = merging_runtime()
    flow = models_request()
    Models(runtime.state).request(flow)
    flow.response = tutils.tresp(status_code=status, content=b'{"error": {}}')
    ModelsMerge(runtime.state).response(flow)
    assert flow.response.content == b'{"error": {}}'


def test_an_answer_recovered_in_the_error_hook_is_merged_before_it_is_sent():
    runtime = merging_runtime()
    flow = models_request()
    Models(runtime.state).request(flow)
    merge = ModelsMerge(runtime.state)
    flow.error = mitmproxy_flow.Error("connection reset")
    flow.response = tutils.tresp(content=UPSTREAM_LIST)
    merge.error(flow)  # not recovered: mitmproxy answers its 502
    assert listed(flow) == ["gpt-4o"]
    flow.error = None  # the key pool's retry answered (addons/recovery.py sends it)
    merge.error(flow)
    assert listed(flow) == ["gpt-4o", "llama-3"]


def test_a_list_that_is_not_a_list_is_left_as_it_is():
    runtime = merging_runtime()
    flow = models_request()
    Models(runtime.state).request(flow)
    flow.response = tutils.tresp(content=b"not json")
    ModelsMerge(runtime.state).response(flow)
    assert flow.response.content == b"not json"
